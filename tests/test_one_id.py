"""One operation id names one operation: its first command in the stream. A later command with
the same id and another body is rejected `conflict`, whichever copy is delivered first, and
never delays another operation; what the executor keeps in mind stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from actors.executor import ExecutorActor
from bus import Bus, Consumer, Delivery, Retry
from bus.topology import EXECUTOR, TOPOLOGY, command_subject
from schemas.common import GIB
from schemas.config import Settings
from simulator import SimConfig, Simulator
from tests.conftest import NatsServer, wait_for


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as s:
        yield s


def executor_settings(nats: NatsServer, sim: Simulator) -> Settings:
    return Settings(
        nats_url=nats.url,
        cloudstack_endpoint=sim.url,
        cloudstack_key=sim.api_key,
        cloudstack_secret=sim.secret_key,
        vm_id=sim.local_vm_id,
        cloudstack_retry_budget=2.0,
        cloudstack_retry_cap=0.2,
        cloudstack_retry_backoff=0.02,
        cloudstack_poll_interval=0.05,
    )


class Events:
    def __init__(self) -> None:
        self.by_op: dict[str, list[dict[str, Any]]] = {}

    async def on_event(self, _subject: str, data: bytes, _reply: str | None) -> None:
        event = json.loads(data)
        self.by_op.setdefault(event["operation_id"], []).append(event)

    def of(self, op_id: str) -> list[dict[str, Any]]:
        return self.by_op.get(op_id, [])

    def own_terminal(self, op_id: str) -> dict[str, Any] | None:
        """The operation's own terminal event (not a rejected copy's)."""
        for e in self.of(op_id):
            if e["status"] in ("completed", "failed", "cancelled") and not e.get("rejected_copy"):
                return e
        return None

    def rejected_copies(self, op_id: str) -> list[dict[str, Any]]:
        return [e for e in self.of(op_id) if e.get("rejected_copy")]


async def test_one_id_for_two_volumes_the_later_copies_first(
    nats_server: NatsServer, sim: Simulator
) -> None:
    """Commands 1-4: X detaches A, Y detaches B, Y detaches A, X detaches B; the two later
    copies are delivered (and would be claimed) before the originals. The old executor let
    the copies claim the ids: each lane then waited for the other's operation for ever, the
    ack floor stood still and every later command was kept in mind."""
    bus = await Bus.connect(nats_server.url, "one-id")
    events = Events()
    task: asyncio.Task[None] | None = None
    executor = ExecutorActor(bus, executor_settings(nats_server, sim), "one-id")
    try:
        await bus.provision(TOPOLOGY)
        await bus.subscribe("volume.events.>", events.on_event)
        seqs = [
            await bus.publish(command_subject("detach"), {"operation_id": op, "volume_id": vol})
            for op, vol in (("x", "vol-a"), ("y", "vol-b"), ("y", "vol-a"), ("x", "vol-b"))
        ]
        originals = set(seqs[:2])
        copies_seen = asyncio.Event()
        handle = executor.handle

        async def late_originals(d: Delivery) -> None:
            # The originals' first deliveries come late (another process took them and was
            # slow, say): the copies are handled first.
            if d.stream_seq in originals and d.num_delivered == 1:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(3.0):
                        await copies_seen.wait()
            await handle(d)

        executor.handle = late_originals  # type: ignore[method-assign]
        task = asyncio.create_task(executor.run())

        def copies_answered() -> bool:
            # The old executor claims each copy (its `pending` names the copy's volume);
            # this one rejects it at once.
            return any(e["volume_id"] == "vol-b" for e in events.of("x")) and any(
                e["volume_id"] == "vol-a" for e in events.of("y")
            )

        await wait_for(copies_answered, timeout=10)
        copies_seen.set()
        # The operations are the first commands: X on vol-a, Y on vol-b, both run (and fail:
        # the simulator has no such volumes); each copy is rejected conflict, once.
        x = await wait_for(lambda: events.own_terminal("x"), timeout=10)
        y = await wait_for(lambda: events.own_terminal("y"), timeout=10)
        assert (x["volume_id"], x["status"], x["error"]["code"]) == ("vol-a", "failed", "not_found")
        assert (y["volume_id"], y["status"], y["error"]["code"]) == ("vol-b", "failed", "not_found")
        for op_id, copy_seq, copy_volume in (("x", seqs[3], "vol-b"), ("y", seqs[2], "vol-a")):
            (rejected,) = events.rejected_copies(op_id)
            assert rejected["status"] == "rejected" and rejected["error"]["code"] == "conflict"
            assert (rejected["rejected_copy"], rejected["volume_id"]) == (copy_seq, copy_volume)
            own = [e["status"] for e in events.of(op_id) if not e.get("rejected_copy")]
            # (A core subscriber may also get a publish-if-last the stream refused: the same
            # step twice, never a step back.)
            assert sorted(set(own), key=own.index) == ["pending", "executing", "failed"], own
        # Many commands after them: both lanes go on, the ack floor follows, and what the
        # executor keeps in mind shrinks back once they are acknowledged.
        ops = [f"n-{i}" for i in range(60)]
        for i, op_id in enumerate(ops):
            body = {"operation_id": op_id, "volume_id": "vol-a" if i % 2 else "vol-b"}
            last = await bus.publish(command_subject("detach"), body)
        await wait_for(lambda: all(events.own_terminal(o) for o in ops), timeout=30)
        await wait_for(lambda: _floor_reached(bus, last), timeout=10)  # every command acknowledged
        await asyncio.sleep(0.6)  # (the executor reuses an ack floor read this long)
        await bus.publish(command_subject("detach"), {"operation_id": "z", "volume_id": "vol-a"})
        await wait_for(lambda: events.own_terminal("z"), timeout=10)
        assert executor.order.known <= 2, executor.order.known
        assert len(executor.order._first) <= 2
        assert executor.order.watched == 0
        assert not executor._inflight
    finally:
        executor.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await bus.close()


async def _floor_reached(bus: Bus, seq: int) -> bool:
    return (await bus.consumer_progress(EXECUTOR)).ack_floor >= seq


async def test_the_same_body_again_is_a_resend_not_a_conflict(
    nats_server: NatsServer, sim: Simulator
) -> None:
    """The same command again (its fields in another order, its id in the header) is the
    idempotent re-send: no conflict, the operation's latest event again."""
    bus = await Bus.connect(nats_server.url, "one-id")
    events = Events()
    executor = ExecutorActor(bus, executor_settings(nats_server, sim), "one-id")
    task: asyncio.Task[None] | None = None
    try:
        await bus.provision(TOPOLOGY)
        await bus.subscribe("volume.events.>", events.on_event)
        await bus.publish(command_subject("detach"), {"operation_id": "s", "volume_id": "vol-a"})
        await bus.nc.publish(
            command_subject("detach"),
            b'{ "volume_id" : "vol-a" }',
            headers={"Nats-Msg-Id": "s"},
        )
        task = asyncio.create_task(executor.run())
        await wait_for(lambda: events.own_terminal("s"), timeout=10)
        await asyncio.sleep(0.3)
        assert not events.rejected_copies("s")
        statuses = [e["status"] for e in events.of("s")]
        assert statuses.count("rejected") == 0 and statuses[-1] == "failed", statuses
    finally:
        executor.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await bus.close()


async def test_only_deliveries_that_ran_or_failed_count_towards_give_up(
    nats_server: NatsServer, sim: Simulator
) -> None:
    """A command handed back again and again while it only waited for its turn is not given
    up (it runs when its turn comes); one that fails before its claim on every delivery ends
    `failed` with its one event, not silently."""
    bus = await Bus.connect(nats_server.url, "give-up")
    events = Events()
    executor = ExecutorActor(bus, executor_settings(nats_server, sim), "give-up")
    task: asyncio.Task[None] | None = None
    spec = replace(EXECUTOR, give_up_after=2, nak_delays=(0.05,))

    async def handler(d: Delivery) -> None:
        op_id = json.loads(d.data).get("operation_id")
        if op_id == "b":
            raise RuntimeError("fails before its claim")
        if op_id == "w" and d.num_delivered <= 3:
            # Handed back while it waits for its turn (its process restarted, say).
            handling = asyncio.create_task(executor.handle(d))
            await asyncio.sleep(0.3)
            handling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handling
            raise Retry("handed back while it waited", delay=0.05)
        await executor.handle(d)

    consumer = Consumer(bus, spec, handler, on_give_up=executor.give_up, counted=executor.counted)
    try:
        await bus.provision(TOPOLOGY)
        await executor.open()
        await bus.subscribe("volume.events.>", events.on_event)
        create = {"operation_id": "c", "name": "v", "size": GIB}
        create |= {"disk_offering_id": sim.disk_offering_ids[0], "zone_id": sim.zone_id}
        await bus.publish(command_subject("create"), create)
        task = asyncio.create_task(consumer.run())
        created = await wait_for(lambda: events.own_terminal("c"), timeout=10)
        volume_id = created["volume_id"]
        sim.set_latency(1.5, "attachVolume")
        vm = next(v for v in sim.vm_ids if v != sim.local_vm_id)
        await bus.publish(
            command_subject("attach"), {"operation_id": "a", "volume_id": volume_id, "vm_id": vm}
        )
        await wait_for(lambda: "executing" in [e["status"] for e in events.of("a")])
        await bus.publish(command_subject("detach"), {"operation_id": "w", "volume_id": volume_id})
        await bus.publish(command_subject("detach"), {"operation_id": "b", "volume_id": "x"})
        ended = await wait_for(lambda: events.own_terminal("b"), timeout=10)
        assert ended["status"] == "failed" and ended["error"]["code"] == "internal", ended
        assert await wait_for(lambda: events.own_terminal("a"), timeout=10)
        detach = await wait_for(lambda: events.own_terminal("w"), timeout=10)
        assert detach["status"] == "completed", detach  # not given up: it never failed
    finally:
        if task is not None:
            consumer.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await executor.cloud.close()
        await bus.close()
