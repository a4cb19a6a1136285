"""What reading after the writers costs a query: latency with and without the wait.

Real nats-server, `volumed run executor persistence` as a process on MariaDB, the simulator
as a process with zero job latency, twice in one run: with VOLUMED_QUERY_WAIT=0 (answer at
once, the old behaviour) and with the default wait. In each:
- idle: --idle sequential `volume.api.operation` queries while nothing else happens;
- flowing: creates paced at --rate ops/s, and on each `completed` event a query at once
  (the issue's experiment): its latency, and how many answers did not show completed.
Figures: p50/p99 of each, and the ratios wait / no wait.

    python -m bench.bench_queries [--idle 500] [--rate 100] [--ops 500]
"""

from __future__ import annotations

import argparse
import asyncio
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
from bus.topology import TOPOLOGY
from schemas.common import GIB


async def query(bus: Bus, op_id: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    msg = await bus.nc.request(
        "volume.api.operation", json.dumps({"operation_id": op_id}).encode(), timeout=10
    )
    elapsed = 1000 * (time.perf_counter() - start)
    return elapsed, json.loads(msg.data) if msg.data else {}


def create(sim: dict[str, Any], op_id: str) -> dict[str, object]:
    return {
        "operation_id": op_id,
        "name": f"bench-{op_id}",
        "size": GIB,
        "zone_id": sim["zone_id"],
        "disk_offering_id": sim["disk_offering_ids"][0],
    }


async def one_mode(
    nats_url: str, sim: dict[str, Any], wait: str, args: argparse.Namespace
) -> dict[str, list[float]]:
    db = database_name()
    env = volumed_env(nats_url, db, sim, VOLUMED_QUERY_WAIT=wait)
    try:
        with volumed(env, "executor", "persistence"):
            bus = await Bus.connect(nats_url, "bench")
            await bus.provision(TOPOLOGY)
            try:
                return await measure(bus, sim, args)
            finally:
                await bus.close()
    finally:
        drop_database(db)


async def measure(
    bus: Bus, sim: dict[str, Any], args: argparse.Namespace
) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    flow: list[float] = []
    stale = 0
    asked: set[asyncio.Task[None]] = set()
    completed: dict[str, asyncio.Future[None]] = {}

    async def ask(op_id: str) -> None:
        nonlocal stale
        elapsed, answer = await query(bus, op_id)
        flow.append(elapsed)
        stale += answer.get("status") != "completed"
        fut = completed.pop(op_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        event = json.loads(msg.data)
        if event["status"] == "completed" and event["operation_id"] in completed:
            task = loop.create_task(ask(event["operation_id"]))
            asked.add(task)
            task.add_done_callback(asked.discard)

    await bus.nc.subscribe("volume.events.>", cb=on_event)

    # Warm up: volumed consumes, and the first operation is in the database.
    first = f"q-{uuid.uuid4().hex[:16]}"
    completed[first] = loop.create_future()
    await bus.publish("volume.cmd.create", create(sim, first))
    await asyncio.wait_for(completed[first], 60)
    for _ in range(1200):  # at most a minute
        if (await query(bus, first))[1].get("status") == "completed":
            break
        await asyncio.sleep(0.05)
    flow.clear()
    stale = 0

    idle = [(await query(bus, first))[0] for _ in range(args.idle)]

    futures = []
    start = time.perf_counter()
    for n in range(args.ops):
        delay = start + n / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        op_id = f"q-{uuid.uuid4().hex[:16]}"
        futures.append(completed.setdefault(op_id, loop.create_future()))
        await bus.publish("volume.cmd.create", create(sim, op_id))
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    return {"idle": idle, "flow": flow, "stale": [float(stale)]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=500, help="idle queries, one at a time")
    parser.add_argument("--rate", type=float, default=100.0, help="flowing phase: creates/s")
    parser.add_argument("--ops", type=int, default=500, help="flowing phase: creates")
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {}
    with nats_server() as nats_url, simulator("--seed", "7") as sim:
        for name, wait in (("nowait", "0"), ("wait", "2")):
            results[name] = await one_mode(nats_url, sim, wait, args)
    for name, r in results.items():
        for phase in ("idle", "flow"):
            figure(f"query_{phase}_{name}_p50", percentile(r[phase], 50), "ms")
            figure(f"query_{phase}_{name}_p99", percentile(r[phase], 99), "ms")
        figure(f"query_flow_{name}_stale", r["stale"][0], "answers")
    figure("query_flow_answers", float(args.ops), "answers")
    for phase in ("idle", "flow"):
        for p in (50, 99):
            base = percentile(results["nowait"][phase], p)
            figure(
                f"query_{phase}_wait_ratio_p{p}",
                percentile(results["wait"][phase], p) / base,
                "x",
            )


if __name__ == "__main__":
    asyncio.run(main())
