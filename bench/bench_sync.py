"""What `sync_interval: always` costs: the same work against a nats-server with JetStream's
default (sync every 2 minutes, acknowledge at once) and against one that syncs to disk
before each acknowledgement, in one run, a fresh server (its store under --store-dir, which
must be the disk to measure: a tmpfs store hides the cost) for each.

- publish: acknowledged publishes to a one-replica file stream, --messages of them with
  --in-flight outstanding (`publish_<mode>_rate`), then --serial one at a time (the latency
  one waiting client sees: `publish_serial_<mode>_p50/p99`);
- the same on the 3-node loopback cluster of deploy/nats/ with a 3-replica stream
  (`publish_r3_<mode>_rate`, `publish_serial_r3_<mode>_p50/p99`; --no-cluster skips it);
- lifecycle: create + delete through `volumed run executor persistence` (MariaDB, the
  simulator as a process with zero job latency), bench_lifecycle's throughput phase with
  --volumes and --window: `lifecycle_<mode>_throughput` and its latencies.
Then the ratios always / default: `publish_rate_ratio`, `publish_serial_p50_ratio`,
`publish_r3_rate_ratio`, `publish_serial_r3_p50_ratio`, `lifecycle_throughput_ratio` (a rate
ratio below 1: slower with syncing; a latency ratio above 1: slower).

    python -m bench.bench_sync [--messages 20000] [--in-flight 256] [--serial 1000]
                               [--volumes 300] [--window 100] [--store-dir DIR] [--no-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.bench_lifecycle import throughput, warmed_up
from bench.common import (
    ROOT,
    database_name,
    drop_database,
    figure,
    free_port,
    nats_server,
    percentile,
    simulator,
    volumed,
    volumed_env,
    wait_port,
)
from bus import Bus

MODES = ("default", "always")
LOOPBACK = ROOT / "deploy" / "nats" / "cluster-loopback.conf"


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


@contextlib.contextmanager
def cluster(mode: str, store_parent: str | None) -> Iterator[str]:
    """The 3-node loopback cluster of deploy/nats/ on free ports; for "default", its config
    without `sync_interval: always`. Yields the three URLs, comma-separated."""
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    text = LOOPBACK.read_text()
    if mode == "default":
        text = "\n".join(x for x in text.splitlines() if "sync_interval" not in x)
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]  # client, http, route
    routes = ", ".join(f"nats://127.0.0.1:{route}" for _, _, route in ports)
    with tempfile.TemporaryDirectory(dir=store_parent) as tmp:
        config = Path(tmp) / "node.conf"
        config.write_text(text)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for n, (client, http, route) in enumerate(ports, 1):
                env = {
                    "NATS_NAME": f"n{n}",
                    "NATS_PORT": str(client),
                    "NATS_HTTP_PORT": str(http),
                    "NATS_CLUSTER_PORT": str(route),
                    "NATS_ROUTES": f"[{routes}]",
                    "NATS_STORE_DIR": str(Path(tmp) / f"n{n}"),
                }
                procs.append(
                    subprocess.Popen(
                        [str(binary), "-c", str(config)],
                        env={**os.environ, **env},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            for client, _, _ in ports:
                wait_port(client)
            yield ",".join(f"nats://127.0.0.1:{client}" for client, _, _ in ports)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)


async def publish_phase(
    url: str, mode: str, args: argparse.Namespace, replicas: int = 1
) -> dict[str, float]:
    """Publish figures named publish_<mode>_... (publish_r3_<mode>_... with 3 replicas)."""
    name = mode if replicas == 1 else f"r{replicas}_{mode}"
    bus = await Bus.connect(url, f"bench-sync-{mode}")
    try:
        # A new cluster takes a moment to elect its JetStream leader and know its peers.
        deadline = time.monotonic() + 60
        while True:
            try:
                await bus.js.add_stream(
                    name="BENCH_SYNC", subjects=["bench.sync.>"], num_replicas=replicas
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        payload = b"x" * 200  # about the size of a command or an event
        gate = asyncio.Semaphore(args.in_flight)

        async def one(n: int) -> None:
            async with gate:
                await bus.js.publish(f"bench.sync.{n % 64}", payload)

        start = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(args.messages)))
        rate = args.messages / (time.perf_counter() - start)
        figure(f"publish_{name}_rate", rate, "msgs/s")

        serial: list[float] = []
        for n in range(args.serial):
            t0 = time.perf_counter()
            await bus.js.publish(f"bench.sync.{n % 64}", payload)
            serial.append(1000 * (time.perf_counter() - t0))
        p50, p99 = percentile(serial, 50), percentile(serial, 99)
        figure(f"publish_serial_{name}_p50", p50, "ms")
        figure(f"publish_serial_{name}_p99", p99, "ms")
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
    parser.add_argument(
        "--no-cluster", action="store_true", help="skip the 3-node, 3-replica publish phase"
    )
    args = parser.parse_args()

    published: dict[str, dict[str, float]] = {}
    for mode in MODES:
        with server(mode, args.store_dir) as url:
            published[mode] = await publish_phase(url, mode, args)
    clustered: dict[str, dict[str, float]] = {}
    if not args.no_cluster:
        for mode in MODES:
            with cluster(mode, args.store_dir) as urls:
                clustered[mode] = await publish_phase(urls, mode, args, replicas=3)
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
    if clustered:
        figure(
            "publish_r3_rate_ratio", clustered["always"]["rate"] / clustered["default"]["rate"], "x"
        )
        figure(
            "publish_serial_r3_p50_ratio",
            clustered["always"]["serial_p50"] / clustered["default"]["serial_p50"],
            "x",
        )
    figure("lifecycle_throughput_ratio", lifecycle["always"] / lifecycle["default"], "x")


if __name__ == "__main__":
    asyncio.run(main())
