"""What `sync_interval: always` costs: the same work against a nats-server with JetStream's
default (sync every 2 minutes, acknowledge at once) and against one that syncs to disk
before each acknowledgement, in one run, a fresh server (its store under --store-dir, which
must be the disk to measure: a tmpfs store hides the cost) for each.

- publish: acknowledged publishes to a one-replica file stream, --messages of them with
  --in-flight outstanding (`publish_<mode>_rate`), then --serial one at a time (the latency
  one waiting client sees: `publish_serial_<mode>_p50/p99`);
- lifecycle: create + delete through `volumed run executor persistence` (MariaDB, the
  simulator as a process with zero job latency), bench_lifecycle's throughput phase with
  --volumes and --window: `lifecycle_<mode>_throughput` and its latencies.
Then the ratios always / default: `publish_rate_ratio`, `publish_serial_p50_ratio`,
`lifecycle_throughput_ratio` (below 1: slower with syncing).

    python -m bench.bench_sync [--messages 20000] [--in-flight 256] [--serial 1000]
                               [--volumes 300] [--window 100] [--store-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.bench_lifecycle import throughput, warmed_up
from bench.common import (
    database_name,
    drop_database,
    figure,
    nats_server,
    percentile,
    simulator,
    volumed,
    volumed_env,
)
from bus import Bus

MODES = ("default", "always")


@contextlib.contextmanager
def server(mode: str, store_parent: str | None) -> Iterator[str]:
    """A private nats-server with JetStream's default syncing, or with the repository's
    `sync_interval: always`."""
    if mode == "default":
        with nats_server(store_parent=store_parent) as url:
            yield url
        return
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sync-always.conf"
        config.write_text("jetstream {\n  sync_interval: always\n}\n")
        with nats_server("-c", str(config), store_parent=store_parent) as url:
            yield url


async def publish_phase(url: str, mode: str, args: argparse.Namespace) -> dict[str, float]:
    bus = await Bus.connect(url, f"bench-sync-{mode}")
    try:
        await bus.js.add_stream(name="BENCH_SYNC", subjects=["bench.sync.>"], num_replicas=1)
        payload = b"x" * 200  # about the size of a command or an event
        gate = asyncio.Semaphore(args.in_flight)

        async def one(n: int) -> None:
            async with gate:
                await bus.js.publish(f"bench.sync.{n % 64}", payload)

        start = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(args.messages)))
        rate = args.messages / (time.perf_counter() - start)
        figure(f"publish_{mode}_rate", rate, "msgs/s")

        serial: list[float] = []
        for n in range(args.serial):
            t0 = time.perf_counter()
            await bus.js.publish(f"bench.sync.{n % 64}", payload)
            serial.append(1000 * (time.perf_counter() - t0))
        p50, p99 = percentile(serial, 50), percentile(serial, 99)
        figure(f"publish_serial_{mode}_p50", p50, "ms")
        figure(f"publish_serial_{mode}_p99", p99, "ms")
        return {"rate": rate, "serial_p50": p50}
    finally:
        await bus.close()


async def lifecycle_phase(
    url: str, mode: str, sim: dict[str, Any], args: argparse.Namespace
) -> float:
    db = database_name()
    try:
        with volumed(volumed_env(url, db, sim), "executor", "persistence"):
            bus = await Bus.connect(url, f"bench-sync-{mode}")
            try:
                client = await warmed_up(bus, sim)
                return await throughput(client, args.volumes, args.window, f"lifecycle_{mode}")
            finally:
                await bus.close()
    finally:
        drop_database(db)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000, help="publishes, in flight")
    parser.add_argument("--in-flight", type=int, default=256, help="publishes outstanding")
    parser.add_argument("--serial", type=int, default=1000, help="publishes, one at a time")
    parser.add_argument("--volumes", type=int, default=300, help="volumes created and deleted")
    parser.add_argument("--window", type=int, default=100, help="operations in flight at most")
    parser.add_argument(
        "--store-dir", default=None, help="where the servers' stores go (default: the temp dir)"
    )
    args = parser.parse_args()

    published: dict[str, dict[str, float]] = {}
    for mode in MODES:
        with server(mode, args.store_dir) as url:
            published[mode] = await publish_phase(url, mode, args)
    lifecycle: dict[str, float] = {}
    with simulator("--seed", "7") as sim:
        for mode in MODES:
            with server(mode, args.store_dir) as url:
                lifecycle[mode] = await lifecycle_phase(url, mode, sim, args)

    figure("publish_rate_ratio", published["always"]["rate"] / published["default"]["rate"], "x")
    figure(
        "publish_serial_p50_ratio",
        published["always"]["serial_p50"] / published["default"]["serial_p50"],
        "x",
    )
    figure("lifecycle_throughput_ratio", lifecycle["always"] / lifecycle["default"], "x")


if __name__ == "__main__":
    asyncio.run(main())
