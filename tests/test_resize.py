"""A resized disk is the same disk: it keeps its owner and never proves another attach
(issue item 5). The simulator hot-plugs serial-less fake devices; the resize rewrites the
device's size file in place, as the kernel's capacity change does."""

from __future__ import annotations

import os
from pathlib import Path

from schemas.common import GIB
from simulator import Simulator
from tests.conftest import Database, NatsServer, stop_volumed, wait_for
from tests.test_devices_e2e import create_many, fake_tree, hotplugging, start
from tests.test_lifecycle import op


async def test_resized_disk_is_not_given_to_a_waiting_attach_of_its_new_size(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=41, serials=False)) as sim:
        v = await start(nats_server, database, sim, sysfs, dev)
        try:
            owner, waiting = await create_many(v, sim, 2, [1, 2])
            a = op()
            await v.send(
                "attach", {"operation_id": a, "volume_id": owner, "vm_id": sim.local_vm_id}
            )
            event = await v.terminal(a, timeout=30)
            assert event["status"] == "completed", event
            owners_disk = os.path.join(str(dev), sim.devices[owner])
            assert event["device_path"] == owners_disk

            # The next attach (2 GiB) waits for its device, which comes late...
            sim.hotplug.hotplug_delay = 1.5
            b = op()
            await v.send(
                "attach", {"operation_id": b, "volume_id": waiting, "vm_id": sim.local_vm_id}
            )
            await wait_for(lambda: "executing" in v.statuses(b), 10)
            # ...and meanwhile the owner's disk grows to 2 GiB.
            sim.hotplug.resize(owner, 2 * GIB)

            event = await v.terminal(b, timeout=30)
            assert event["status"] == "completed", event
            assert event["device_path"] != owners_disk, "the waiting attach took the owner's disk"
            assert event["device_path"] == os.path.join(str(dev), sim.devices[waiting])

            async def both_mapped() -> dict[str, object] | None:
                rows = await database.query(
                    "SELECT volume_id, device_path FROM device_mappings WHERE vm_id = %s",
                    sim.local_vm_id,
                )
                found = {str(r["volume_id"]): r["device_path"] for r in rows}
                return found if len(found) == 2 else None

            mapped = await wait_for(both_mapped, 10)
            assert mapped[owner] == owners_disk  # the owner's mapping stays
            assert mapped[waiting] == event["device_path"]
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]
