"""Scale-out of the executor: create + delete throughput with 1, 2 and 3 processes.

For each count, side by side in one run and under the same conditions: a fresh nats-server,
a fresh MariaDB database, a fresh simulator process with the same settings (--job-latency,
default 0), and that many `volumed run executor persistence` processes sharing the work.
Once every process's executor beats, bench_lifecycle's throughput phase runs: --volumes
volumes created and each deleted as soon as its create completes, --window operations in
flight at most. Figures per count N: `executors_<N>_throughput` (ops/s) with its latencies,
and `executors_<N>_ratio` (throughput / the 1-process throughput). With --rounds R the counts
run R times, interleaved, each round's figures named `executors_<N>_round_<r>_...`, and
`executors_<N>_throughput_median` is the median over the rounds, which the ratios then use.

    python -m bench.bench_executors [--volumes 1000] [--window 200] [--job-latency 0]
                                    [--processes 1,2,3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections import Counter

from bench.bench_lifecycle import throughput, warmed_up
from bench.common import (
    database_name,
    drop_database,
    figure,
    nats_server,
    simulator,
    volumed,
    volumed_env,
)
from bus import Bus
from bus.topology import HEALTH_BUCKET, TOPOLOGY


async def executors_beating(bus: Bus, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` executors have written their heartbeat: all of them consume."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # the bucket is empty or not made yet
            keys = await (await bus.js.key_value(HEALTH_BUCKET.name)).keys()
            if Counter(k.split(".", 1)[0] for k in keys)["executor"] >= count:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} executors did not all start within {timeout} s")
        await asyncio.sleep(0.2)


async def one_count(processes: int, args: argparse.Namespace, prefix: str) -> float:
    """Throughput (ops/s) with ``processes`` executor processes; figures named ``prefix``_..."""
    db = database_name()
    sim_args = ["--seed", "7", "--job-latency", str(args.job_latency)]
    try:
        with nats_server() as url, simulator(*sim_args) as sim:
            env = volumed_env(url, db, sim, VOLUMED_HEARTBEAT_INTERVAL="0.5")
            with contextlib.ExitStack() as stack:
                for _ in range(processes):
                    stack.enter_context(volumed(env, "executor", "persistence"))
                bus = await Bus.connect(url, f"bench-executors-{processes}")
                try:
                    await bus.provision(TOPOLOGY)
                    await executors_beating(bus, processes)
                    client = await warmed_up(bus, sim)
                    return await throughput(client, args.volumes, args.window, prefix)
                finally:
                    await bus.close()
    finally:
        drop_database(db)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=1000, help="volumes created and deleted")
    parser.add_argument("--window", type=int, default=200, help="operations in flight at most")
    parser.add_argument(
        "--job-latency", type=float, default=0.0, help="seconds the simulator's jobs take"
    )
    parser.add_argument(
        "--processes", default="1,2,3", help="executor process counts, comma-separated"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every count this many times, interleaved (1, 2, 3, 1, 2, 3, ...), so that "
        "a machine busy with other work weighs on each alike; the ratios use the medians",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]

    rates: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(1, args.rounds + 1):
        for n in counts:
            prefix = f"executors_{n}" if args.rounds == 1 else f"executors_{n}_round_{r}"
            rates[n].append(await one_count(n, args, prefix))
    medians = {n: statistics.median(found) for n, found in rates.items()}
    if args.rounds > 1:
        for n, rate in medians.items():
            figure(f"executors_{n}_throughput_median", rate, "ops/s")
    base = medians.get(1)
    if base:
        for n, rate in medians.items():
            figure(f"executors_{n}_ratio", rate / base, "x")


if __name__ == "__main__":
    asyncio.run(main())
