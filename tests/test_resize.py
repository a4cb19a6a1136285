"""A resized disk is the same disk: it keeps its owner and never proves another attach
(issue item 5). The simulator hot-plugs serial-less fake devices; the resize rewrites the
device's size file in place, as the kernel's capacity change does."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import msgspec
import pytest

from bus import Bus
from bus.topology import COMMANDS, OPERATIONS_BUCKET, TOPOLOGY, Topology, command_subject
from client import Client
from client.errors import OperationFailed
from schemas.common import GIB, now_rfc3339
from schemas.internal import OpRecord, Phase
from simulator import SimConfig, Simulator
from tests.conftest import (
    Database,
    Harness,
    NatsServer,
    VolumedProcess,
    start_volumed,
    stop_volumed,
    volumed_env,
    wait_for,
)
from tests.test_cli import volumed_cli
from tests.test_devices_e2e import create_many, fake_tree, hotplugging, start
from tests.test_lifecycle import ACTORS, create_body, create_volume, op, remote_vm, settings_for
from tests.test_persistence import (  # noqa: F401  (fixtures)
    Rows,
    backend,
    bus,
    ev,
    publish_all,
    request,
    running,
)


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


# -- volume.cmd.resize ------------------------------------------------------------------------


def resizes(sim: Simulator) -> list[object]:
    return [c for c in sim.calls if c.command == "resizeVolume"]


async def mapping_of(database: Database, volume_id: str) -> dict[str, object] | None:
    rows = await database.query("SELECT * FROM device_mappings WHERE volume_id = %s", volume_id)
    return rows[0] if rows else None


async def test_resize_of_a_local_volume_completes_once_its_device_shows_the_new_size(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    """Serial-less, so the device is the one the mapping names (proven by exclusion); the
    proof survives the size change. A device that does not grow in time fails the resize
    with device_timeout, and nothing is detached."""
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=43, serials=False)) as sim:
        v = await start(nats_server, database, sim, sysfs, dev, correlation_timeout=2.0)
        try:
            (volume,) = await create_many(v, sim, 1, [1])
            a = op()
            await v.send(
                "attach", {"operation_id": a, "volume_id": volume, "vm_id": sim.local_vm_id}
            )
            attached = await v.terminal(a, timeout=30)
            assert attached["status"] == "completed", attached
            device = attached["device_path"]

            async def proven() -> dict[str, object] | None:
                row = await mapping_of(database, volume)
                return row if row and row["proof"] == "exclusive" else None

            before = await wait_for(proven, 10)
            assert before["device_path"] == device and before["size"] == GIB

            # CloudStack resizes; the guest's kernel sees it only when the test says so.
            held: list[tuple[str, int]] = []
            grow = sim.hotplug.resize
            sim.hotplug.resize = lambda volume_id, size: held.append((volume_id, size))  # type: ignore[method-assign]

            late = op()
            await v.send("resize", {"operation_id": late, "volume_id": volume, "size": 2 * GIB})
            failed = await v.terminal(late, timeout=15)
            assert failed["status"] == "failed", failed
            error: dict[str, str] = failed["error"]  # type: ignore[assignment]
            assert error["code"] == "device_timeout"
            assert f"{device} still shows 1 GiB" in error["message"], error
            assert "stays attached" in error["message"]
            assert sim.volumes[volume].vm_id == sim.local_vm_id  # nothing undone
            assert not [c for c in sim.calls if c.command == "detachVolume"]

            r = op()
            await v.send("resize", {"operation_id": r, "volume_id": volume, "size": 3 * GIB})
            await wait_for(lambda: len(held) == 2, 10)
            await asyncio.sleep(0.5)  # ten rescans: the device still shows its old size
            assert v.statuses(r) == ["pending", "executing"], v.statuses(r)
            grow(volume, 3 * GIB)
            done = await v.terminal(r, timeout=10)
            assert done["status"] == "completed", done
            assert done["type"] == "resize" and done["size"] == 3 * GIB
            assert done["device_path"] == device and done["volume_id"] == volume
            assert done["vm_id"] == sim.local_vm_id

            # The mapping says the new size (a query made after the event shows it), still
            # names the disk, still proven.
            mapping, _ = await v.query("mapping", {"volume_id": volume})
            assert mapping["size"] == 3 * GIB and mapping["device_path"] == device, mapping
            row = await mapping_of(database, volume)
            assert row is not None and row["size"] == 3 * GIB

            async def proven_again() -> dict[str, object] | None:
                row = await mapping_of(database, volume)
                newer = row and row["proven_at"] != before["proven_at"]
                return row if newer else None

            again = await wait_for(proven_again, 10)
            assert again["proof"] == "exclusive" and again["device_path"] == device
            assert again["operation_id"] == a
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_resize_of_detached_and_remote_volumes_shrink_cancel_and_bad_sizes(
    nats_server: NatsServer, database: Database
) -> None:
    async with Simulator(SimConfig(seed=44)) as sim:
        settings = settings_for(nats_server, database, sim)
        volumed, task = await start_volumed(settings, ACTORS, sim)
        try:
            await resizes_of_one_volume(volumed, sim, database, nats_server)
        finally:
            await stop_volumed(volumed, task)


async def resizes_of_one_volume(
    volumed: Harness, sim: Simulator, database: Database, nats_server: NatsServer
) -> None:
    volume = await create_volume(volumed, sim, "to-resize")  # 1 GiB, detached

    # Bad sizes are rejected naming the field, and nothing is sent.
    for bad in (0, -GIB, GIB + 1, "2G", None):
        o = op()
        await volumed.send("resize", {"operation_id": o, "volume_id": volume, "size": bad})
        event = await volumed.terminal(o)
        assert event["status"] == "rejected", event
        assert event["type"] == "resize"
        error: dict[str, str] = event["error"]  # type: ignore[assignment]
        assert error["code"] == "invalid_request" and error["message"].startswith("size: "), error

    # Grow a detached volume.
    o = op()
    await volumed.send("resize", {"operation_id": o, "volume_id": volume, "size": 3 * GIB})
    event = await volumed.terminal(o)
    assert event["status"] == "completed", event
    assert event["size"] == 3 * GIB and event["device_path"] is None and event["vm_id"] is None
    assert volumed.statuses(o) == ["pending", "executing", "completed"]
    assert sim.volumes[volume].size == 3 * GIB
    row = await volumed.row(database, o, "completed")
    assert row["type"] == "resize" and row["volume_id"] == volume
    # Sent again (same operation id): its latest event again, nothing sent to CloudStack.
    await volumed.send("resize", {"operation_id": o, "volume_id": volume, "size": 3 * GIB})
    await wait_for(lambda: len(volumed.statuses(o)) == 4)
    assert volumed.statuses(o)[3] == "completed" and len(resizes(sim)) == 1

    # A shrink without shrink_ok fails before any CloudStack mutation.
    o = op()
    await volumed.send("resize", {"operation_id": o, "volume_id": volume, "size": GIB})
    event = await volumed.terminal(o)
    assert event["status"] == "failed", event
    error = event["error"]  # type: ignore[assignment]
    assert error["code"] == "invalid_request", error
    assert "shrink_ok" in error["message"] and "3 GiB" in error["message"], error
    assert len(resizes(sim)) == 1 and sim.volumes[volume].size == 3 * GIB

    # With it, through the CLI (`volumed resize VOLUME SIZE --shrink-ok`).
    ran = await volumed_cli(nats_server, "resize", volume, "2G", "--shrink-ok", "--json")
    assert ran.code == 0, ran
    last = ran.lines()[-1]
    assert last["status"] == "completed" and last["size"] == 2 * GIB, ran
    assert sim.volumes[volume].size == 2 * GIB and len(resizes(sim)) == 2

    # The client; the same size again completes without a CloudStack mutation.
    async with await Client.connect(nats_server.url) as client:
        same = await client.resize(volume, 2 * GIB, timeout=15)
        assert same.size == 2 * GIB and len(resizes(sim)) == 2
        try:
            await client.resize(volume, GIB, timeout=15)
            raise AssertionError("a shrink without shrink_ok completed")
        except OperationFailed as e:
            assert e.code == "invalid_request"

    # Attached to a VM volumed does not watch: completes with the job; the mapping follows.
    vm = remote_vm(sim)
    a = op()
    await volumed.send("attach", {"operation_id": a, "volume_id": volume, "vm_id": vm})
    assert (await volumed.terminal(a))["status"] == "completed"
    o = op()
    await volumed.send("resize", {"operation_id": o, "volume_id": volume, "size": 4 * GIB})
    event = await volumed.terminal(o)
    assert event["status"] == "completed" and event["vm_id"] == vm, event
    mapping, _ = await volumed.query("mapping", {"volume_id": volume})
    assert mapping["size"] == 4 * GIB and mapping["vm_id"] == vm, mapping

    # Cancelled while it waits for the volume's turn: never sent.
    sim.set_latency(0.5)
    d, waiting, c = op(), op(), op()
    await volumed.send("detach", {"operation_id": d, "volume_id": volume})
    await volumed.send("resize", {"operation_id": waiting, "volume_id": volume, "size": 8 * GIB})
    await wait_for(lambda: "executing" in volumed.statuses(d))
    await wait_for(lambda: "pending" in volumed.statuses(waiting))
    await volumed.send("cancel", {"operation_id": c, "target": waiting})
    assert (await volumed.terminal(c))["status"] == "completed"
    assert (await volumed.terminal(waiting))["status"] == "cancelled"
    assert (await volumed.terminal(d))["status"] == "completed"
    assert volumed.statuses(waiting) == ["pending", "cancelled"]
    await asyncio.sleep(0.6)
    assert len(resizes(sim)) == 3 and sim.volumes[volume].size == 4 * GIB


async def test_a_resize_in_flight_when_volumed_is_killed_resumes_without_sending_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`volumed run` (every actor, SQLite) is killed -9 while the resizeVolume job of a
    volume attached to the local VM runs; restarted, it waits for that job (its id is in the
    record), then for the device's new size, and completes: one resizeVolume in all."""
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=45, serials=True)) as sim:
        env = volumed_env(
            nats_server.url,
            f"sqlite:///{tmp_path / 'volumed.db'}",
            sim,
            VOLUMED_SYSFS=str(sysfs),
            VOLUMED_DEV=str(dev),
            VOLUMED_DEVICES="vd*",
            VOLUMED_POLL_INTERVAL="0.1",
        )
        log = tmp_path / "volumed.log"
        process = VolumedProcess(env, (), log_path=log)
        await process.start()
        user = await Bus.connect(nats_server.url, "test-user")
        v = Harness(bus=user, sim=sim, settings=None, supervisor=None)

        async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
            event = json.loads(msg.data)
            v.events.setdefault(event["operation_id"], []).append(event)

        await user.nc.subscribe("volume.events.>", cb=on_event)
        try:
            await wait_for(lambda: "volumed running" in log.read_text(), 60, interval=0.05)
            c, a, r = op(), op(), op()
            await v.send("create", create_body(sim, c, "crash-resize"))
            volume = str((await v.terminal(c, timeout=30))["volume_id"])
            await v.send(
                "attach", {"operation_id": a, "volume_id": volume, "vm_id": sim.local_vm_id}
            )
            attached = await v.terminal(a, timeout=30)
            assert attached["status"] == "completed", attached

            sim.set_latency(3.0, "resizeVolume")
            await v.send("resize", {"operation_id": r, "volume_id": volume, "size": 2 * GIB})
            ops = await user.bucket(OPERATIONS_BUCKET, OpRecord)

            async def job_recorded() -> bool:
                got = await ops.get(r)
                return got is not None and got[0].phase == Phase.RESIZE and bool(got[0].job_id)

            await wait_for(job_recorded, 15)
            await process.kill()
            assert sim.volumes[volume].size == GIB  # the job still runs

            await process.start()
            done = await v.terminal(r, timeout=60)
            assert done["status"] == "completed", (done, log.read_text()[-3000:])
            assert done["size"] == 2 * GIB and done["device_path"] == attached["device_path"]
            assert len(resizes(sim)) == 1
            assert [e["status"] for e in v.events[r]].count("completed") == 1
            mapping, _ = await v.query("mapping", {"volume_id": volume})
            assert mapping["size"] == 2 * GIB, mapping
        finally:
            await process.stop()
            await user.close()


async def test_a_command_stream_made_before_resize_takes_resize_commands(
    bus: Bus,  # noqa: F811
) -> None:
    """An existing installation's command stream gains volume.cmd.resize when volumed
    provisions again (at start)."""
    before = ("create", "attach", "detach", "delete", "cancel")
    old = dataclasses.replace(COMMANDS, subjects=tuple(command_subject(t) for t in before))
    await bus.provision(Topology(streams=(old,)))
    info = await bus.js.stream_info(COMMANDS.name)
    assert command_subject("resize") not in (info.config.subjects or [])
    await bus.provision(TOPOLOGY)
    info = await bus.js.stream_info(COMMANDS.name)
    assert command_subject("resize") in (info.config.subjects or [])


def test_resizes_are_counted_under_their_own_type() -> None:
    from actors.metrics import REGISTRY
    from actors.metrics.exporter import OperationsSeen
    from schemas.events import OperationEvent

    labels = {"type": "resize", "status": "completed", "code": ""}
    counted = REGISTRY.get_sample_value("volumed_operations_total", labels) or 0.0
    seen = OperationsSeen()
    for status in ("pending", "executing", "completed"):
        body = {"operation_id": "m-1", "type": "resize", "status": status, "at": now_rfc3339()}
        seen.event(msgspec.json.decode(json.dumps(body), type=OperationEvent))
    assert REGISTRY.get_sample_value("volumed_operations_total", labels) == counted + 1


async def test_the_mapping_takes_the_size_of_the_newest_resize_in_command_order(
    bus: Bus,  # noqa: F811
    backend: tuple[str, Database | None],  # noqa: F811
) -> None:
    """Resize events that arrive out of command order (redeliveries, several writers): the
    mapping keeps the newest one's size, and a resize older than the attach its mapping
    shows changes nothing."""
    dsn, database = backend
    rows = Rows(dsn, database)
    mapped = {"volume_id": "vol-z", "vm_id": "vm-1"}
    async with running(bus, dsn):
        await publish_all(
            bus,
            [
                ev("z-a", "attach", "completed", 1, **mapped, size=GIB, attached=True, seq=1),
                ev("z-r3", "resize", "completed", 3, volume_id="vol-z", size=3 * GIB, seq=3),
                ev("z-r2", "resize", "completed", 2, volume_id="vol-z", size=2 * GIB, seq=2),
            ],
        )
        await wait_for(lambda: rows.op("z-r2"))
        mapping = await request(bus, "mapping", {"volume_id": "vol-z"})
        assert mapping["size"] == 3 * GIB, mapping

        await publish_all(
            bus,
            [
                ev("z-d", "detach", "completed", 4, **mapped, attached=False, seq=4),
                ev("z-a2", "attach", "completed", 6, **mapped, size=5 * GIB, attached=True, seq=6),
                ev("z-r5", "resize", "completed", 5, volume_id="vol-z", size=4 * GIB, seq=5),
            ],
        )
        await wait_for(lambda: rows.op("z-r5"))
        mapping = await request(bus, "mapping", {"volume_id": "vol-z"})
        assert mapping["size"] == 5 * GIB and mapping["operation_id"] == "z-a2", mapping


@pytest.mark.parametrize("op_type", ["create", "resize"])
def test_a_size_beyond_a_signed_64_bit_number_is_rejected_before_cloudstack(op_type: str) -> None:
    """2**63 bytes is a whole number of GiB, but no record or mapping can hold it: accepted,
    CloudStack resized to it (the simulator did), and the completed event was dead-lettered,
    leaving the operation ``executing`` in the database for ever."""
    from schemas.commands import InvalidCommand, decode_command
    from schemas.rest import CreateVolumeRequest

    body = {"volume_id": "v-1", "name": "n", "disk_offering_id": "o", "zone_id": "z"}
    for size in (2**63, 2**64 - GIB):
        with pytest.raises(InvalidCommand, match="size: must be a positive whole number"):
            decode_command(op_type, json.dumps({**body, "size": size}).encode())
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({**body, "size": size}, CreateVolumeRequest)
    assert decode_command(op_type, json.dumps({**body, "size": 2**63 - GIB}).encode())
