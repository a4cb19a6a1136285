"""Findings of a review of the executor, each shown with real NATS: the serial-less attach
gate is opened per host, not per process; a mutation sent twice (a process that lost its
lease while paused before its send) is found by a look-up, never failed as a repeat."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from actors.executor import ExecutorActor
from actors.executor.run import OperationRun
from bus import Bus
from bus.lease import LeaseLost
from bus.topology import TOPOLOGY, command_subject
from schemas.config import Settings
from schemas.internal import OpRecord
from simulator import Fault, Simulator
from tests.conftest import NatsServer, wait_for
from tests.test_one_id import Events, executor_settings, sim

__all__ = ["sim"]  # the simulator fixture


async def test_serials_shown_on_a_host_open_its_gate_in_every_process(
    nats_server: NatsServer,
) -> None:
    """An attach proven by serial in one executor process opens the host's gate for the
    others too (they never ran an attach to it); a later proof by exclusion, in any process,
    closes it for all."""
    bus = await Bus.connect(nats_server.url, "gate")
    try:
        await bus.provision(TOPOLOGY)
        one, two = (
            ExecutorActor(bus, Settings(nats_url=nats_server.url), name) for name in ("1", "2")
        )
        await one.open()
        await two.open()
        assert not await two.deps.serials.shown("vm-1")
        await one.deps.serials.note("vm-1", "serial", "op-1")
        assert await two.deps.serials.shown("vm-1")
        assert not await two.deps.serials.shown("vm-2")  # per host
        await two.deps.serials.note("vm-1", "exclusion", "op-2")
        assert not await one.deps.serials.shown("vm-1")
    finally:
        await bus.close()


async def test_a_repeat_refused_after_another_send_landed_is_looked_up(
    nats_server: NatsServer, sim: Simulator
) -> None:
    """Another process, paused between its lease check and its attachVolume, sends it after
    this one has looked up and sent it again: one of the two jobs fails as a repeat. The
    operation looks before it sends again (or fails): the volume is attached as asked, so it
    completes."""
    bus = await Bus.connect(nats_server.url, "resend")
    events = Events()
    executor = ExecutorActor(bus, executor_settings(nats_server, sim), "resend")
    task: asyncio.Task[None] | None = None
    try:
        await bus.provision(TOPOLOGY)
        await bus.subscribe("volume.events.>", events.on_event)
        task = asyncio.create_task(executor.run())
        create = {"operation_id": "c", "name": "v", "size": 1 << 30}
        create |= {"disk_offering_id": sim.disk_offering_ids[0], "zone_id": sim.zone_id}
        await bus.publish(command_subject("create"), create)
        volume_id = (await wait_for(lambda: events.own_terminal("c"), timeout=10))["volume_id"]
        vm = next(v for v in sim.vm_ids if v != sim.local_vm_id)
        sim.set_latency(0.5, "attachVolume")
        sim.inject(Fault(kind="job", command="attachVolume", count=1))
        await bus.publish(
            command_subject("attach"), {"operation_id": "a", "volume_id": volume_id, "vm_id": vm}
        )
        await wait_for(lambda: any(c.command == "attachVolume" for c in sim.calls))
        # The paused process's send lands now (its job works on the volume meanwhile).
        other = sim.client(fetch_result=False)
        await other.attachVolume(id=volume_id, virtualmachineid=vm)
        ended = await wait_for(lambda: events.own_terminal("a"), timeout=15)
        assert ended["status"] == "completed", ended
    finally:
        executor.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await bus.close()


async def test_a_sender_whose_record_was_taken_over_stops_after_its_send(
    nats_server: NatsServer,
) -> None:
    """After a mutation is sent, the record's next write (its job id) is compare-and-set:
    if another process changed the record meanwhile (it took the operation over while this
    one was paused), this one stops (LeaseLost) instead of saving its job over the other's."""
    bus = await Bus.connect(nats_server.url, "still-ours")
    try:
        await bus.provision(TOPOLOGY)
        executor = ExecutorActor(bus, Settings(nats_url=nats_server.url), "still-ours")
        await executor.open()
        run = OperationRun(executor.deps, "op-1")
        record = OpRecord(operation_id="op-1", type="detach", status="pending", stream_seq=1)
        record.last_event = run.event_for(record, "pending")
        await run.claim(record)
        run.record.mutation_sent = 1.0
        await run.save()  # nobody else touched it
        got = await executor.records.ops.get("op-1")
        assert got is not None
        got[0].mutation_sent = 2.0  # the taker's "mutation sent", before its own send
        await executor.records.ops.update("op-1", got[0], got[1])
        run.record.job_id = "job-1"
        with pytest.raises(LeaseLost):
            await run.save()
    finally:
        await bus.close()
