"""Bus messages and volumed's CPU per operation: what one create and one delete cost.

Real nats-server with its HTTP monitoring on, `volumed run executor persistence` as a process
on MariaDB, the simulator as a process with zero job latency. --volumes creates, then as many
deletes, --window in flight at most; for each phase: `messages_<create|delete>_per_op`, the
messages through nats-server (/varz in_msgs + out_msgs) per operation less the measuring
client's own (its commands, their acks and the events delivered to it: /connz), less the
idle traffic of the same span (heartbeats, idle pulls; measured before); and
`cpu_<create|delete>_per_op_ms`, volumed's user + system CPU per operation. A second
connection subscribed to every subject (`>`) counts what was published, by subject, per
operation (`subject <phase> <subject>: n`): KV writes and reads of each bucket, JetStream API
calls, consumer deliveries and acks, events (its own deliveries are left out of the totals).

    python -m bench.bench_messages [--volumes 100] [--window 1] [--idle 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

from bench.bench_lifecycle import Client, warmed_up
from bench.common import (
    Monitor,
    cpu_seconds,
    database_name,
    drop_database,
    figure,
    free_port,
    nats_server,
    simulator,
    volumed,
    volumed_env,
)
from bus import Bus

CLIENT = "bench-messages"
SPY = "bench-messages-spy"


def subject_kind(subject: str, reply: str, data: bytes) -> str:
    """A subject with its per-operation parts (keys, ids, inboxes) taken out."""
    tokens = subject.split(".")
    if reply.startswith("$JS.ACK."):
        ack = reply.split(".")
        return f"delivery {ack[2]}/{ack[3]}"
    if subject.startswith("$JS.ACK."):
        what = data[:5].decode(errors="replace").strip() or "+ACK"
        return f"ack {tokens[2]}/{tokens[3]} {what}"
    if subject.startswith("$KV."):
        return f"kv write {tokens[1]}"
    if subject.startswith("$JS.API.DIRECT.GET."):
        return f"kv/stream get {tokens[4]}"
    if subject.startswith("$JS.API.STREAM.MSG.GET."):
        return f"stream msg get {tokens[5]}"
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return f"pull request {tokens[5]}/{tokens[6]}"
    if subject.startswith("$JS.API."):
        return ".".join(tokens[:5])
    if subject.startswith("$JS.EVENT."):
        return ".".join(tokens[:5])
    if subject.startswith("_INBOX."):
        return "reply (_INBOX)"
    if subject.startswith("volume.events."):
        return "event published"
    return ".".join(tokens[:3])


class Spy:
    """Counts every message published on the server, by kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def on_message(self, msg: Any) -> None:
        self.counts[subject_kind(msg.subject, msg.reply or "", msg.data or b"")] += 1


async def phase(
    name: str,
    client: Client,
    bodies: list[tuple[str, dict[str, object]]],
    window: int,
    monitor: Monitor,
    pid: int,
    idle_rate: float,
    spy: Spy,
) -> list[dict[str, object]]:
    gate = asyncio.Semaphore(window)

    async def one(op_type: str, body: dict[str, object]) -> dict[str, object]:
        async with gate:
            return await asyncio.wait_for(await client.send(op_type, body), 60)

    spy.counts.clear()
    before, cpu_before, start = monitor.messages(leaving_out=(CLIENT, SPY)), cpu_seconds(pid), 0.0
    start = time.perf_counter()
    done = await asyncio.gather(*(one(t, b) for t, b in bodies))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(0.3)  # the last acks and database writes
    elapsed_all = time.perf_counter() - start
    after, cpu_after = monitor.messages(leaving_out=(CLIENT, SPY)), cpu_seconds(pid)
    n = len(bodies)
    failed = sum(1 for e in done if e["status"] != "completed")
    messages = (after - before) - idle_rate * elapsed_all
    figure(f"messages_{name}_ops", n, "ops")
    figure(f"messages_{name}_failed", failed, "ops")
    figure(f"messages_{name}_per_op", messages / n, "msgs")
    figure(f"cpu_{name}_per_op_ms", 1000 * (cpu_after - cpu_before) / n, "ms")
    figure(f"messages_{name}_throughput", n / elapsed, "ops/s")
    for kind, count in sorted(spy.counts.items(), key=lambda kv: -kv[1]):
        print(f"subject {name} {kind}: {count / n:.2f}", flush=True)
    return done


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=100, help="volumes created and deleted")
    parser.add_argument("--window", type=int, default=1, help="operations in flight at most")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle traffic read")
    args = parser.parse_args()

    db = database_name()
    port = free_port()
    monitor = Monitor(port)
    with nats_server("-m", str(port)) as url, simulator("--seed", "7") as sim:
        env = volumed_env(url, db, sim)
        try:
            with volumed(env, "executor", "persistence") as proc:
                bus = await Bus.connect(url, CLIENT)
                spy_bus = await Bus.connect(url, SPY)
                spy = Spy()
                await spy_bus.nc.subscribe(">", cb=spy.on_message)
                client = await warmed_up(bus, sim)
                await asyncio.sleep(1.0)  # the warm-up's tail
                before, start = monitor.messages(leaving_out=(CLIENT, SPY)), time.perf_counter()
                await asyncio.sleep(args.idle)
                idle = monitor.messages(leaving_out=(CLIENT, SPY)) - before
                idle_rate = idle / (time.perf_counter() - start)
                figure("messages_idle_rate", idle_rate, "msgs/s")
                creates = [("create", client.create_body(n)) for n in range(args.volumes)]
                done = await phase(
                    "create", client, creates, args.window, monitor, proc.pid, idle_rate, spy
                )
                deletes: list[tuple[str, dict[str, object]]] = [
                    ("delete", {"volume_id": e["volume_id"]})
                    for e in done
                    if e["status"] == "completed"
                ]
                await phase(
                    "delete", client, deletes, args.window, monitor, proc.pid, idle_rate, spy
                )
                await spy_bus.close()
                await bus.close()
        finally:
            drop_database(db)


if __name__ == "__main__":
    asyncio.run(main())
