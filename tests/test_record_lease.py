"""The operation's record as its lease, and its start written with its first save
(actors/executor/run.py): a held record is free to another process only after a whole ttl
unchanged on that process's own clock; an operation that ends before any other write still
says `executing` before its terminal event, also when it was cut off between the two; a
cancel that wins before the first write stops the run before it sends anything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.executor import ExecutorActor
from actors.executor.run import OperationRun
from bus import Bus
from bus.lease import now
from bus.topology import EVENTS, TOPOLOGY
from schemas.config import Settings
from schemas.internal import OpRecord
from simulator import Simulator
from simulator.faults import Fault
from tests import test_lifecycle
from tests.conftest import Harness, NatsServer, wait_for
from tests.test_lifecycle import calls, create_volume, op

sim = test_lifecycle.sim
volumed = test_lifecycle.volumed


@pytest.fixture
async def executor(nats_server: NatsServer) -> AsyncIterator[ExecutorActor]:
    bus = await Bus.connect(nats_server.url, "record-lease")
    await bus.provision(TOPOLOGY)
    actor = ExecutorActor(bus, Settings(nats_url=nats_server.url), "record-lease")
    await actor.open()
    yield actor
    await bus.close()


def _held(op_id: str, holder: str) -> OpRecord:
    return OpRecord(
        operation_id=op_id, type="detach", status="executing", stream_seq=1, holder=holder
    )


async def test_a_held_record_is_free_only_after_a_whole_ttl_unchanged(
    executor: ExecutorActor,
) -> None:
    records, ttl = executor.records, 0.6
    revision = await records.ops.create("op-1", _held("op-1", "a/1"))
    started = now()
    got = await records.free("op-1", ttl)
    assert got is not None and got[1] == revision
    assert now() - started >= ttl

    # Its holder writing it keeps it: free only a whole ttl after the last write.
    async def holder_writes() -> None:
        nonlocal revision
        for _ in range(6):
            await asyncio.sleep(0.2)
            revision = await records.ops.update("op-1", _held("op-1", "a/1"), revision)

    started = now()
    writes = asyncio.create_task(holder_writes())
    got = await records.free("op-1", ttl)
    await writes
    assert got is not None and got[1] == revision
    assert now() - started >= 1.2 + ttl - 0.05

    with pytest.raises(TimeoutError):
        await records.free("op-1", 10.0, timeout=0.5)

    # Let go (holder cleared), or ended: free at once.
    revision = await records.ops.update("op-1", _held("op-1", ""), revision)
    started = now()
    assert await records.free("op-1", 10.0) is not None
    assert now() - started < 1.0


async def _statuses(bus: Bus, op_id: str) -> list[str]:
    info = await bus.js.stream_info(EVENTS.name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg(EVENTS.name, seq)
        if msg.subject and msg.subject.endswith(op_id):
            out.append(msg.data.decode() if msg.data else "")
    return [s.split('"status":"')[1].split('"')[0] for s in out]


async def test_an_executing_event_cut_off_before_the_terminal_one_goes_out_first(
    executor: ExecutorActor,
) -> None:
    """A run whose first write was its terminal one, cut off before it published either
    event: whoever publishes the latest event publishes `executing` first."""
    run = OperationRun(executor.deps, "op-2")
    record = OpRecord(operation_id="op-2", type="delete", status="pending", stream_seq=1)
    record.last_event = run.event_for(record, "pending")
    await run.claim(record)
    record.status, record.runs = "failed", 1
    record.last_event = run.event_for(record, "failed")
    await executor.records.ops.update("op-2", record, run.revision)
    await executor.records.publish_latest("op-2")
    await executor.records.publish_latest("op-2")  # (nothing more: it is out)
    assert await _statuses(executor.bus, "op-2") == ["pending", "executing", "failed"]


async def test_an_operation_that_ends_before_any_write_still_says_executing(
    volumed: Harness, sim: Simulator
) -> None:
    delete_id = op()
    await volumed.send("delete", {"operation_id": delete_id, "volume_id": "no-such-volume"})
    done = await volumed.terminal(delete_id)
    assert done["status"] == "failed" and done["error"]["code"] == "not_found"  # type: ignore[index]
    await asyncio.sleep(0.3)
    assert volumed.statuses(delete_id) == ["pending", "executing", "failed"]


async def test_a_cancel_before_the_first_write_stops_the_run_before_it_sends(
    volumed: Harness, sim: Simulator
) -> None:
    """A delete looks its volume up before its first write (which starts it): a cancel that
    comes meanwhile finds it pending and wins; the delete's first write then fails, and it
    stops, having sent nothing."""
    volume_id = await create_volume(volumed, sim)
    looked_up = len(calls(sim, "listVolumes"))
    sim.inject(Fault(kind="hang", command="listVolumes", seconds=2))
    delete_id, cancel_id = op(), op()
    await volumed.send("delete", {"operation_id": delete_id, "volume_id": volume_id})
    await wait_for(lambda: len(calls(sim, "listVolumes")) > looked_up, 10)
    await volumed.send("cancel", {"operation_id": cancel_id, "target": delete_id})
    assert (await volumed.terminal(cancel_id))["status"] == "completed"
    assert (await volumed.terminal(delete_id))["status"] == "cancelled"
    await asyncio.sleep(3.0)  # the look-up answers: the delete's run goes on, and stops
    assert volumed.statuses(delete_id) == ["pending", "cancelled"]
    assert calls(sim, "deleteVolume") == []
    assert volume_id in sim.world.volumes  # type: ignore[attr-defined]
