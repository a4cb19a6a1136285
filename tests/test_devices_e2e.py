"""Attaches to the local VM end to end: the simulator hot-plugs fake devices into a sysfs/dev
tree, the watcher sees them (rescans: the tree is not /sys), the correlator names them, the
executor completes the attach with the device, persistence records the mapping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas.common import GIB, serial_of
from simulator import SimConfig, Simulator
from tests.conftest import Database, Harness, NatsServer, start_volumed, stop_volumed, wait_for
from tests.test_lifecycle import create_body, op, settings_for

ALL = ["persistence", "executor", "watcher", "correlator"]


def fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (sysfs / "block" / "vda").mkdir(parents=True)  # the root disk, present from the start
    (sysfs / "block" / "vda" / "size").write_text(f"{20 * GIB // 512}\n")
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "vda").touch()
    return sysfs, dev


async def start(
    nats_server: NatsServer,
    database: Database,
    sim: Simulator,
    sysfs: Path,
    dev: Path,
    **over: object,
) -> Harness:
    options: dict[str, object] = dict(
        sysfs=str(sysfs),
        dev=str(dev),
        devices=("vd*",),
        poll_interval=0.05,
        correlation_timeout=5.0,
        detach_timeout=5.0,
    )
    options.update(over)
    settings = settings_for(nats_server, database, sim, **options)
    harness, task = await start_volumed(settings, ALL, sim)
    harness.task = task  # type: ignore[attr-defined]
    return harness


async def create_many(v: Harness, sim: Simulator, n: int, sizes: list[int]) -> list[str]:
    ids = [op() for _ in range(n)]
    for i, o in enumerate(ids):
        await v.send("create", create_body(sim, o, f"local-{i}", gib=sizes[i % len(sizes)]))
    out = []
    for o in ids:
        event = await v.terminal(o)
        assert event["status"] == "completed", event
        out.append(str(event["volume_id"]))
    return out


def device_of_volume(sysfs: Path, volume_id: str) -> str | None:
    """Ground truth: the fake device whose serial is the volume's."""
    for d in (sysfs / "block").iterdir():
        serial = d / "serial"
        if serial.exists() and serial.read_text() == serial_of(volume_id):
            return d.name
    return None


def hotplugging(sysfs: Path, dev: Path, *, seed: int, serials: bool) -> SimConfig:
    """A simulated CloudStack that hot-plugs local attaches into the fake tree."""
    return SimConfig(
        seed=seed,
        sysfs_root=str(sysfs),
        dev_root=str(dev),
        serials=serials,
        max_data_disks=30,
        job_latency=0.02,
        hotplug_delay=0.05,
    )


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    return fake_tree(tmp_path)


async def test_twenty_concurrent_local_attaches_with_serials(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=3, serials=True)) as sim:
        v = await start(nats_server, database, sim, sysfs, dev)
        try:
            volumes = await create_many(v, sim, 20, [1, 2])
            attach_ops = [op() for _ in volumes]
            for o, vol in zip(attach_ops, volumes, strict=True):
                await v.send(
                    "attach", {"operation_id": o, "volume_id": vol, "vm_id": sim.local_vm_id}
                )
            for o, vol in zip(attach_ops, volumes, strict=True):
                event = await v.terminal(o, timeout=60)
                assert event["status"] == "completed", event
                name = device_of_volume(sysfs, vol)
                assert name is not None
                assert event["device_path"] == os.path.join(str(dev), name)
                assert event["by_id_path"] == os.path.join(
                    str(dev), "disk", "by-id", f"virtio-{serial_of(vol)}"
                )

            # device_mappings: one row per attached volume, with the right device.
            async def all_mapped() -> bool:
                rows = await database.query("SELECT volume_id, device_path FROM device_mappings")
                return len(rows) == 20

            await wait_for(all_mapped, 10)
            rows = await database.query("SELECT volume_id, device_path, size FROM device_mappings")
            for row in rows:
                name = device_of_volume(sysfs, str(row["volume_id"]))
                assert row["device_path"] == os.path.join(str(dev), str(name))
            # The query answers by volume and by device path.
            reply, code = await v.query("mapping", {"volume_id": volumes[0]})
            assert code is None and reply["device_path"]
            reply2, _ = await v.query("mapping", {"device_path": reply["device_path"]})
            assert reply2["volume_id"] == volumes[0]
            listed, _ = await v.query("vm_volumes", {"vm_id": sim.local_vm_id})
            assert len(listed["volumes"]) == 20  # type: ignore[arg-type]

            # Detach completes once the device has gone, and the mapping goes with it.
            d = op()
            await v.send("detach", {"operation_id": d, "volume_id": volumes[0]})
            event = await v.terminal(d, timeout=30)
            assert event["status"] == "completed", event
            assert device_of_volume(sysfs, volumes[0]) is None

            async def unmapped() -> bool:
                return not await database.query(
                    "SELECT 1 FROM device_mappings WHERE volume_id=%s", volumes[0]
                )

            await wait_for(unmapped, 10)
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_eight_concurrent_same_size_attaches_without_serials(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=4, serials=False)) as sim:
        v = await start(nats_server, database, sim, sysfs, dev)
        try:
            volumes = await create_many(v, sim, 8, [1])
            attach_ops = [op() for _ in volumes]
            for o, vol in zip(attach_ops, volumes, strict=True):
                await v.send(
                    "attach", {"operation_id": o, "volume_id": vol, "vm_id": sim.local_vm_id}
                )
            completed = 0
            for o, vol in zip(attach_ops, volumes, strict=True):
                event = await v.terminal(o, timeout=90)
                if event["status"] == "completed":
                    completed += 1
                    # The ground truth is the simulator's own record of where it plugged it.
                    assert event["device_path"] == os.path.join(str(dev), sim.devices[vol]), (
                        event,
                        sim.devices,
                    )
                else:
                    assert event["error"]["code"] in ("ambiguous_device", "device_timeout")  # type: ignore[index]
                    # Nothing half done: a failed attach is detached again.
                    assert sim.volumes[vol].vm_id is None, "a failed attach stayed attached"
            # The executor lets serial-less local attaches through one at a time, so each is
            # provable: all complete.
            assert completed == 8
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_attach_whose_device_never_appears_is_rolled_back(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    # The simulator hot-plugs nothing (no sysfs root): the device never appears.
    async with Simulator(SimConfig(seed=5)) as sim:
        v = await start(nats_server, database, sim, sysfs, dev, correlation_timeout=0.5)
        try:
            (vol,) = await create_many(v, sim, 1, [1])
            a = op()
            await v.send("attach", {"operation_id": a, "volume_id": vol, "vm_id": sim.local_vm_id})
            event = await v.terminal(a, timeout=30)
            assert event["status"] == "failed"
            assert event["error"]["code"] == "device_timeout"  # type: ignore[index]
            assert "detached again" in event["error"]["message"]  # type: ignore[index]
            assert sim.volumes[vol].vm_id is None
            assert event["device_path"] is None
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_remote_attach_has_no_device(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(SimConfig(seed=6, sysfs_root=str(sysfs), dev_root=str(dev))) as sim:
        v = await start(nats_server, database, sim, sysfs, dev)
        try:
            vols = await create_many(v, sim, 2, [1])
            remote = next(x for x in sim.vm_ids if x != sim.local_vm_id)
            ops = [op(), op()]
            for o, vol in zip(ops, vols, strict=True):
                await v.send("attach", {"operation_id": o, "volume_id": vol, "vm_id": remote})
            for o in ops:
                event = await v.terminal(o)
                assert event["status"] == "completed" and event["device_path"] is None

            async def two_rows() -> bool:
                try:
                    rows = await database.query(
                        "SELECT device_path FROM device_mappings WHERE vm_id=%s", remote
                    )
                except Exception:
                    return False  # the persistence actor has not made its tables yet
                return len(rows) == 2 and all(r["device_path"] is None for r in rows)

            await wait_for(two_rows, 10)
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_health_reports_real_checks(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(SimConfig(seed=8, sysfs_root=str(sysfs), dev_root=str(dev))) as sim:
        v = await start(nats_server, database, sim, sysfs, dev, heartbeat_interval=0.2)
        try:

            async def status(wanted: str) -> dict[str, object] | None:
                reply, code = await v.query("health", {})
                assert code is None
                return reply if reply["status"] == wanted else None

            healthy = await wait_for(lambda: status("ok"), 10)
            checks = healthy["checks"]
            for name in ("nats", "database", "cloudstack", "device_watcher"):
                assert checks[name]["status"] == "ok", checks  # type: ignore[index]
            # CloudStack stops answering: the executor's probe says so, health degrades
            # (degraded, not down: operations retry meanwhile).
            sim.inject(kind="drop", command="listVolumes", count=10_000)
            degraded = await wait_for(lambda: status("degraded"), 10)
            assert degraded["checks"]["cloudstack"]["status"] == "degraded"  # type: ignore[index]
            sim.clear_faults()
            await wait_for(lambda: status("ok"), 10)
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]
