"""End-to-end throughput and latency: create + delete through the bus.

Real nats-server, `volumed run executor persistence` as a process on MariaDB, the simulator
as a process with zero job latency. Phase 1 keeps up to --window operations in flight and
deletes each volume as soon as its create completes: ops/s over all 2 x --volumes
operations, p50/p99 of publish→pending and publish→completed. Phase 2 paces commands at
--rate ops/s and reports publish→pending, the latency a user waits for an acknowledgement.

    python -m bench.bench_lifecycle [--volumes 1000] [--window 200] [--rate 100] [--paced 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

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
from bus.topology import PERSISTENCE, TOPOLOGY
from schemas.common import GIB


class Client:
    def __init__(self, bus: Bus, sim: dict[str, Any]) -> None:
        self.bus = bus
        self.sim = sim
        self.sent: dict[str, float] = {}
        self.pending: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.terminal: dict[str, dict[str, object]] = {}
        self.waiters: dict[str, asyncio.Future[dict[str, object]]] = {}

    async def start(self) -> None:
        async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            event = json.loads(msg.data)
            op_id, status = event["operation_id"], event["status"]
            if status == "pending":
                self.pending.setdefault(op_id, now)
            elif status in ("completed", "failed", "cancelled", "rejected"):
                self.done.setdefault(op_id, now)
                self.terminal[op_id] = event
                fut = self.waiters.pop(op_id, None)
                if fut and not fut.done():
                    fut.set_result(event)

        await self.bus.nc.subscribe("volume.events.>", cb=on_event)

    async def send(
        self, op_type: str, body: dict[str, object]
    ) -> asyncio.Future[dict[str, object]]:
        op_id = f"b-{uuid.uuid4().hex[:20]}"
        fut: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self.waiters[op_id] = fut
        self.sent[op_id] = time.perf_counter()
        await self.bus.publish(f"volume.cmd.{op_type}", {**body, "operation_id": op_id})
        return fut

    def create_body(self, n: int) -> dict[str, object]:
        return {
            "name": f"bench-{n}",
            "size": GIB,
            "zone_id": self.sim["zone_id"],
            "disk_offering_id": self.sim["disk_offering_ids"][0],
        }

    def latencies(self, ops: list[str], stage: dict[str, float]) -> list[float]:
        return [1000 * (stage[o] - self.sent[o]) for o in ops if o in stage]


async def throughput(client: Client, volumes: int, window: int, prefix: str = "lifecycle") -> float:
    """Create and delete ``volumes`` volumes, ``window`` operations in flight at most; print
    the figures (named ``prefix``_...) and return the operations per second."""
    gate = asyncio.Semaphore(window)
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        async with gate:
            created = await asyncio.wait_for(
                await client.send("create", client.create_body(n)), 120
            )
        if created["status"] != "completed":
            failures += 1
            return
        async with gate:
            deleted = await asyncio.wait_for(
                await client.send("delete", {"volume_id": created["volume_id"]}), 120
            )
        if deleted["status"] != "completed":
            failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(volumes)))
    elapsed = time.perf_counter() - start
    ops = list(client.sent)
    rate = len(ops) / elapsed
    figure(f"{prefix}_operations", len(ops), "ops")
    figure(f"{prefix}_failed", failures, "ops")
    figure(f"{prefix}_throughput", rate, "ops/s")
    figure(f"{prefix}_pending_p50", percentile(client.latencies(ops, client.pending), 50), "ms")
    figure(f"{prefix}_pending_p99", percentile(client.latencies(ops, client.pending), 99), "ms")
    figure(f"{prefix}_completed_p50", percentile(client.latencies(ops, client.done), 50), "ms")
    figure(f"{prefix}_completed_p99", percentile(client.latencies(ops, client.done), 99), "ms")
    return rate


async def paced(client: Client, rate: float, count: int) -> None:
    client.sent.clear()
    client.pending.clear()
    client.done.clear()
    futures = []
    start = time.perf_counter()
    for n in range(count):
        target = start + n / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        futures.append(await client.send("create", client.create_body(100_000 + n)))
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    ops = list(client.sent)
    figure("paced_rate", rate, "ops/s")
    figure("paced_pending_p50", percentile(client.latencies(ops, client.pending), 50), "ms")
    figure("paced_pending_p99", percentile(client.latencies(ops, client.pending), 99), "ms")
    figure("paced_completed_p50", percentile(client.latencies(ops, client.done), 50), "ms")
    figure("paced_completed_p99", percentile(client.latencies(ops, client.done), 99), "ms")


async def warmed_up(bus: Bus, sim: dict[str, Any]) -> Client:
    """A client whose first operation has completed: volumed is consuming."""
    await bus.provision(TOPOLOGY)  # idempotent: whoever comes first creates it
    client = Client(bus, sim)
    await client.start()
    await asyncio.wait_for(await client.send("create", client.create_body(-1)), 60)
    client.sent.clear()
    return client


async def drained(bus: Bus) -> None:
    """Wait until the database writer has caught up, so the paced phase measures a steady
    state, not the tail of the throughput phase's backlog."""
    while True:
        info = await bus.js.consumer_info(PERSISTENCE.stream, PERSISTENCE.durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=1000, help="volumes created and deleted")
    parser.add_argument("--window", type=int, default=200, help="operations in flight at most")
    parser.add_argument("--rate", type=float, default=100.0, help="paced phase: ops/s")
    parser.add_argument("--paced", type=int, default=500, help="paced phase: operations")
    parser.add_argument(
        "--split",
        action="store_true",
        help="executor and persistence in two processes instead of one",
    )
    args = parser.parse_args()

    db = database_name()
    with nats_server() as nats_url, simulator("--seed", "7") as sim:
        env = volumed_env(nats_url, db, sim)
        try:
            groups = (
                [["executor"], ["persistence"]] if args.split else [["executor", "persistence"]]
            )
            with contextlib.ExitStack() as stack:
                for group in groups:
                    stack.enter_context(volumed(env, *group))
                bus = await Bus.connect(nats_url, "bench")
                client = await warmed_up(bus, sim)
                await throughput(client, args.volumes, args.window)
                await drained(bus)
                await paced(client, args.rate, args.paced)
                await bus.close()
        finally:
            drop_database(db)


if __name__ == "__main__":
    asyncio.run(main())
