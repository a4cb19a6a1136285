"""Leases (bus.lease) against a real nats-server: one holder at a time, renewal keeps a
lease, takeover only after the holder's own belief has ended, a holder that lost its lease
learns so and never releases another's; and through the daemon, where an operation's lease
is its record (actors/executor/run.py): an operation whose record is taken over stops
before its next CloudStack mutation, and the mutation is sent once in all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.executor import ExecutorActor
from actors.executor.run import HOLD_TTL, OperationRun
from bus import Bus
from bus.lease import LeaseLost, Leases, _now
from bus.topology import BucketSpec, Topology
from schemas.internal import LeaseHolder
from simulator import Simulator
from tests import test_lifecycle
from tests.conftest import Harness, NatsServer, wait_for
from tests.test_lifecycle import calls, create_volume, op, remote_vm

TTL = 1.0
BUCKET = BucketSpec(name="test_leases", ttl=TTL)

sim = test_lifecycle.sim
volumed = test_lifecycle.volumed


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "test-leases")
    await b.provision(Topology(buckets=(BUCKET,)))
    yield b
    await b.close()


async def process(bus: Bus, name: str) -> Leases:
    """The leases of one would-be process."""
    return Leases(await bus.bucket(BUCKET, LeaseHolder), name, TTL)


async def test_one_holder_at_a_time(bus: Bus) -> None:
    a, b = await process(bus, "a"), await process(bus, "b")
    held = await a.try_acquire("op.x")
    assert held is not None and held.valid
    assert await b.try_acquire("op.x") is None
    await a.release(held)
    assert await b.try_acquire("op.x") is not None


async def test_renewal_keeps_a_lease_and_takeover_waits_for_expiry(bus: Bus) -> None:
    a, b = await process(bus, "a"), await process(bus, "b")
    held = await a.try_acquire("op.x")
    assert held is not None
    renewing = asyncio.create_task(a.run())
    try:
        await asyncio.sleep(3 * TTL)  # three ttls: only renewals keep it
        assert held.valid
        assert await b.try_acquire("op.x") is None
    finally:
        renewing.cancel()
    # a dies (no more renewals): b takes over only once a has stopped counting on it.
    taken = await b.acquire("op.x", timeout=5 * TTL)
    taken_at = _now()
    assert not held.valid
    assert held._valid_until <= taken_at
    assert taken.valid


async def test_a_holder_that_lost_its_lease_learns_so_and_leaves_the_new_holders(
    bus: Bus,
) -> None:
    a, b = await process(bus, "a"), await process(bus, "b")
    held = await a.try_acquire("op.x")
    assert held is not None
    taken = await b.acquire("op.x", timeout=5 * TTL)  # a was silent for a ttl
    await a._renew(held)
    assert held.lost
    with pytest.raises(LeaseLost):
        held.check()
    await a.release(held)  # must not delete b's
    assert await a.try_acquire("op.x") is None
    got = await (await bus.bucket(BUCKET, LeaseHolder)).get("op.x")
    assert got is not None and got[0].holder == "b" and got[0].token == taken.token


async def test_a_renewal_whose_answer_was_lost_is_recognised_as_its_own(bus: Bus) -> None:
    a = await process(bus, "a")
    held = await a.try_acquire("op.x")
    assert held is not None
    bucket = await bus.bucket(BUCKET, LeaseHolder)
    # The renewal reached the server, its answer did not reach the holder.
    await bucket.update("op.x", LeaseHolder(holder="a", token=held.token, at=0.0), held.revision)
    await a._renew(held)
    assert not held.lost and held.valid


# -- through the daemon -----------------------------------------------------------------------


async def test_an_operation_whose_lease_expired_sends_no_further_mutation(
    volumed: Harness, sim: Simulator
) -> None:
    """A delete of an attached volume sends detachVolume, then deleteVolume. While the
    detach runs, this process stops renewing its leases (a stalled process): the lease
    expires on the server and another process takes it. The stalled process must not send
    deleteVolume. Once the lease is free again, the command (handed back) is resumed from
    the record: the detach is looked up, not sent again, and the delete is sent once."""
    executor: ExecutorActor = volumed.supervisor.actors["executor"]  # type: ignore[attr-defined]
    volume_id = await create_volume(volumed, sim)
    attach_id = op()
    body = {"operation_id": attach_id, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    await volumed.send("attach", body)
    assert (await volumed.terminal(attach_id))["status"] == "completed"
    ttl = HOLD_TTL
    sim.set_latency(1.2 * ttl, "detachVolume")  # type: ignore[attr-defined]
    delete_id = op()
    await volumed.send("delete", {"operation_id": delete_id, "volume_id": volume_id})
    await wait_for(lambda: len(calls(sim, "detachVolume")) == 1, 10)

    async def stalled(self: OperationRun, *, now_: bool = False) -> None:
        return None

    # The operation's lease is its record (actors/executor/run.py): another process takes
    # it over once it has read the same revision for a whole ttl, by writing it as its own.
    renew = OperationRun.renew
    OperationRun.renew = stalled  # type: ignore[method-assign]
    try:
        got = await executor.records.free(delete_id, ttl, timeout=2 * ttl)
        assert got is not None and got[0].holder, got
        record, revision = got
        record.holder = "another-process"
        revision = await executor.records.ops.update(delete_id, record, revision)
    finally:
        OperationRun.renew = renew  # type: ignore[method-assign]
    # The detach job ends while the lease is the other's: no delete may follow.
    volume = sim.world.volumes[volume_id]  # type: ignore[attr-defined]
    await wait_for(lambda: volume.vm_id is None, 3 * ttl)
    await asyncio.sleep(1.0)
    assert calls(sim, "deleteVolume") == [], "a process whose lease expired sent a mutation"
    assert "completed" not in volumed.statuses(delete_id)
    record.holder = ""  # the other process lets go of it
    await executor.records.ops.update(delete_id, record, revision)

    done = await volumed.terminal(delete_id, timeout=6 * ttl)
    assert done["status"] == "completed", done
    assert len(calls(sim, "detachVolume")) == 1
    assert len(calls(sim, "deleteVolume")) == 1
