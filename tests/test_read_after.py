"""A query made after an event was received reflects at least that event (contract §4)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from actors.persistence.read_after import ReadAfter
from actors.supervisor import Supervisor
from bus import Bus, serve
from bus.connection import ConsumerProgress
from bus.topology import ConsumerSpec, StreamSpec, Topology
from simulator import SimConfig, Simulator
from tests.conftest import Database, NatsServer, start_volumed, stop_volumed, wait_for
from tests.test_lifecycle import create_body, op, remote_vm, settings_for

# -- the server's ack floor, on both servers volumed must work with ---------------------------


@pytest.fixture(params=["modern", "debian-2.9.10"])
async def any_server(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "modern":
        server: NatsServer = request.getfixturevalue("nats_server")
        url = server.url
    else:
        try:
            socket.create_connection(("127.0.0.1", 4222), timeout=0.5).close()
        except OSError:
            pytest.skip("no nats-server on 127.0.0.1:4222")
        url = "nats://127.0.0.1:4222"
    bus = await Bus.connect(url, "read-after")
    yield bus
    await bus.close()


async def test_the_ack_floor_passes_acked_and_terminated_messages(any_server: Bus) -> None:
    bus = any_server
    # Names of our own: the machine's server is shared.
    name = f"H4_READ_AFTER_{uuid.uuid4().hex[:8].upper()}"
    prefix = name.lower()
    stream = StreamSpec(name=name, subjects=(f"{prefix}.>",), storage="memory")
    every = ConsumerSpec(stream=name, durable="every")
    only_a = ConsumerSpec(stream=name, durable="only_a", filter_subject=f"{prefix}.a")
    await bus.provision(Topology(streams=(stream,), consumers=(every, only_a)))
    try:
        seqs = [await bus.publish(f"{prefix}.a", b"%d" % i) for i in range(5)]
        progress = await bus.consumer_progress(every)
        assert progress.ack_floor == 0 and not progress.idle
        assert not progress.covers(seqs[0])

        sub = await bus.js.pull_subscribe_bind(every.durable, name)
        msgs = await sub.fetch(5, timeout=5)
        await msgs[0].ack_sync()
        await msgs[1].term()  # dead-lettered: done for the floor too
        await msgs[2].ack_sync()
        await msgs[4].ack_sync()  # after the terms, on one connection: they are in too
        progress = await bus.consumer_progress(every)
        assert progress.ack_floor == seqs[2] and not progress.idle
        assert progress.covers(seqs[2]) and not progress.covers(seqs[3])
        await msgs[3].term()
        progress = await wait_for(lambda: _idle(bus, every))
        assert progress.ack_floor == seqs[4] and progress.idle
        assert progress.covers(await bus.last_sequence(name))

        # A filter: messages it skips never raise its floor, but then it is idle.
        sub_a = await bus.js.pull_subscribe_bind(only_a.durable, name)
        for m in await sub_a.fetch(5, timeout=5):
            await m.ack_sync()
        await bus.publish(f"{prefix}.b", b"not for only_a")
        last = await bus.last_sequence(name)
        progress = await bus.consumer_progress(only_a)
        assert progress.ack_floor == seqs[4] < last
        assert progress.idle and progress.covers(last)
    finally:
        await bus.js.delete_stream(name)


async def _idle(bus: Bus, spec: ConsumerSpec) -> ConsumerProgress | None:
    progress = await bus.consumer_progress(spec)
    return progress if progress.idle else None


# -- the wait itself ------------------------------------------------------------------------------


async def test_waiting_queries_share_their_polls_and_end_at_the_bound(
    nats_server: NatsServer,
) -> None:
    bus = await Bus.connect(nats_server.url, "read-after")
    stream = StreamSpec(name="RA", subjects=("ra.>",), storage="memory")
    consumer = ConsumerSpec(stream="RA", durable="writer")
    await bus.provision(Topology(streams=(stream,), consumers=(consumer,)))
    read_after = ReadAfter(bus, (consumer,), timeout=1.0)
    try:
        # Nothing published: the floor is there, and 100 queries need few rounds.
        assert all(await asyncio.gather(*(read_after.wait() for _ in range(100))))
        assert read_after.rounds <= 3

        # An event that nobody writes: each query answers at the bound, and says so.
        await bus.publish("ra.x", b"unwritten")
        before = read_after.rounds
        waits = await asyncio.gather(*(read_after.wait() for _ in range(200)))
        assert waits == [False] * 200 and read_after.late == 200
        rounds = read_after.rounds - before
        assert rounds >= 2  # it kept looking, for all of them at once (not each on its own)
        assert rounds < 200

        # The writer catches up: the next query waits only for that.
        sub = await bus.js.pull_subscribe_bind(consumer.durable, "RA")
        waiting = asyncio.create_task(read_after.wait())
        for m in await sub.fetch(1, timeout=5):
            await m.ack_sync()
        assert await waiting
    finally:
        await read_after.close()
        await bus.close()


async def test_a_waiting_query_holds_up_no_other(nats_server: NatsServer) -> None:
    """Queries now wait for the writers: each must wait on its own, not in a line."""
    bus = await Bus.connect(nats_server.url, "service")
    release = asyncio.Event()

    async def handler(body: bytes) -> dict[str, str]:
        if body == b"slow":
            await release.wait()
        return {"answer": body.decode()}

    service = await serve(bus, "h4test", "0.0.1", "", {"q": ("h4test.q", handler)})
    try:
        slow = asyncio.create_task(bus.request("h4test.q", b"slow", timeout=10))
        await asyncio.sleep(0.05)  # the slow one is in first
        assert json.loads(await bus.request("h4test.q", b"fast", timeout=5)) == {"answer": "fast"}
        assert not slow.done()
        release.set()
        assert json.loads(await slow) == {"answer": "slow"}
    finally:
        await service.stop()
        await bus.close()


# -- the experiment, through the daemon ----------------------------------------------


class Asker:
    """Subscribes to every event and, on each terminal one, queries at once."""

    def __init__(self, harness: object) -> None:
        self.harness = harness
        self.answers: list[tuple[str, dict[str, object], str | None, dict[str, object]]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.done: dict[str, asyncio.Future[dict[str, object]]] = {}

    async def start(self) -> None:
        async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
            event = json.loads(msg.data)
            if event["status"] not in ("completed", "failed", "cancelled", "rejected"):
                return
            task = asyncio.create_task(self.ask(event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        await self.harness.bus.nc.subscribe("volume.events.>", cb=on_event)  # type: ignore[attr-defined]

    def expect(self, op_id: str) -> asyncio.Future[dict[str, object]]:
        fut: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self.done[op_id] = fut
        return fut

    async def query(self, endpoint: str, body: object) -> tuple[dict[str, object], str | None]:
        return await self.harness.query(endpoint, body)  # type: ignore[attr-defined,no-any-return]

    async def ask(self, event: dict[str, object]) -> None:
        """Right on receipt, before anything else: the query the issue made."""
        op_id = str(event["operation_id"])
        queries: list[tuple[str, dict[str, object]]] = [
            ("operation", {"operation_id": op_id}),
        ]
        if event["type"] in ("attach", "detach") and event["status"] == "completed":
            queries += [
                ("mapping", {"volume_id": event["volume_id"]}),
                ("vm_volumes", {"vm_id": event["vm_id"]}),
            ]
        answers = await asyncio.gather(*(self.query(e, b) for e, b in queries))
        for (endpoint, _), (reply, code) in zip(queries, answers, strict=True):
            self.answers.append((endpoint, reply, code, event))
        fut = self.done.get(op_id)
        if fut is not None and not fut.done():
            fut.set_result(event)


@pytest.mark.parametrize("writers", [1, 2])
async def test_a_query_right_after_an_event_reflects_it(
    nats_server: NatsServer, database: Database, writers: int
) -> None:
    """The issue's experiment: on each terminal event, query at once. With two persistence
    processes, events and queries are shared between them: a query may be answered by the
    one that did not write its event."""
    async with Simulator(SimConfig(seed=61, max_data_disks=64)) as sim:
        harness, task = await start_volumed(
            settings_for(nats_server, database, sim), ["persistence", "executor"], sim
        )
        second = None
        if writers == 2:
            second = Supervisor(
                settings_for(nats_server, database, sim, instance="second"), ["persistence"]
            )
            second_task = asyncio.create_task(second.run())
            # Not waiting for its database: a query it takes meanwhile waits for that too.
            await asyncio.wait_for(second.ready.wait(), 30)
        asker = Asker(harness)
        await asker.start()
        try:
            # Creates: every operation answer shows the completed it follows.
            creates = [op() for _ in range(60)]
            futures = [asker.expect(o) for o in creates]
            for n, o in enumerate(creates):
                await harness.send("create", create_body(sim, o, f"ra-{n}"))
            created = await asyncio.wait_for(asyncio.gather(*futures), 60)
            volumes = [str(e["volume_id"]) for e in created]
            assert all(e["status"] == "completed" for e in created)

            # Attaches then detaches: the mapping and the VM's volumes follow each at once.
            vm = remote_vm(sim)
            for kind in ("attach", "detach"):
                ops = {v: op() for v in volumes[:20]}
                futures = [asker.expect(o) for o in ops.values()]
                for v, o in ops.items():
                    body = {"operation_id": o, "volume_id": v}
                    await harness.send(kind, body | ({"vm_id": vm} if kind == "attach" else {}))
                done = await asyncio.wait_for(asyncio.gather(*futures), 60)
                assert all(e["status"] == "completed" for e in done), done
            await asyncio.wait_for(asyncio.gather(*asker.tasks), 30)
        finally:
            if second is not None:
                second.stop()
                await asyncio.wait_for(second_task, 30)
            await stop_volumed(harness, task)

    stale = []
    for endpoint, reply, code, event in asker.answers:
        volume = event["volume_id"]
        attached = event["type"] == "attach"
        if endpoint == "operation":
            ok = code is None and reply["status"] == event["status"]
        elif endpoint == "mapping":
            ok = (code is None and reply["vm_id"] == vm) if attached else code == "404"
        else:
            held = [m["volume_id"] for m in reply["volumes"]]  # type: ignore[union-attr]
            ok = code is None and (volume in held) == attached
        if not ok:
            stale.append((endpoint, event["type"], reply, code))
    assert len(asker.answers) == 60 + 2 * 20 * 3
    assert stale == [], f"{len(stale)} answers lag their event, e.g. {stale[:3]}"
