"""The correlator knows the attaches in flight from the attaching bucket (AttachInFlight),
not from the executor's private operation records (issue item 14b)."""

from __future__ import annotations

import uuid
from pathlib import Path

from bus import Bus
from bus.topology import ATTACHING_BUCKET, TOPOLOGY
from schemas.internal import AttachInFlight
from simulator import Simulator
from tests.conftest import Database, NatsServer, stop_volumed
from tests.test_devices_e2e import create_many, fake_tree, hotplugging, start
from tests.test_lifecycle import op


async def test_an_attach_in_flight_in_the_bucket_competes_for_devices(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=31, serials=False)) as sim:
        # An attach to this VM that an executor has in flight (its entry, written as the
        # executor does before the attach turns executing), and one to another VM.
        bus = await Bus.connect(nats_server.url, "test-in-flight")
        try:
            await bus.provision(TOPOLOGY)
            attaching = await bus.bucket(ATTACHING_BUCKET, AttachInFlight)
            for op_id, vm_id in (("op-in-flight", sim.local_vm_id), ("op-far", "another-vm")):
                assert vm_id is not None
                entry = AttachInFlight(operation_id=op_id, volume_id=str(uuid.uuid4()), vm_id=vm_id)
                await attaching.create(op_id, entry)
        finally:
            await bus.close()

        v = await start(nats_server, database, sim, sysfs, dev, correlation_timeout=2.0)
        try:
            (vol,) = await create_many(v, sim, 1, [1])
            a = op()
            await v.send("attach", {"operation_id": a, "volume_id": vol, "vm_id": sim.local_vm_id})
            event = await v.terminal(a, timeout=30)
            # Its device could be the in-flight attach's (size unknown): never a guess.
            assert event["status"] == "failed", event
            assert event["error"]["code"] == "ambiguous_device"  # type: ignore[index]
            message = str(event["error"]["message"])  # type: ignore[index]
            assert "op-in-flight" in message and "op-far" not in message
            assert sim.volumes[vol].vm_id is None  # rolled back
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]
