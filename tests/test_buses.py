"""Disk identity on every bus (contract §6, issue 15 item 2).

First the reading: the serial where each bus keeps it, on the sysfs and /dev layouts the
simulator lays out as the kernel and udev do (virtio-blk ``serial``; SCSI, virtio-scsi
included, VPD page 0x80 in ``device/vpd_pg80``; NVMe the controller's ``device/serial``; Xen
none), and VPD pages as devices really answer them. Then end to end, volumed against the
simulator hot-plugging each bus: the lifecycle, a reboot that renames the disks, concurrent
attaches. Real loop devices cannot stand in for these buses (a loop device has no serial,
no VPD page and no controller), so the simulator's trees are the only ones here.

``VOLUMED_BUSES_FULL=1`` runs the 20 concurrent attaches on every bus with a serial, not
only on virtio-scsi.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from actors.watcher.state import diff_one
from actors.watcher.sysfs import (
    Unreadable,
    bus_of,
    pick_by_id,
    read_device,
    scan,
    scan_detailed,
    vpd_pg80_serial,
)
from schemas.common import GIB, serial_of
from schemas.devices import identity_of
from simulator import Simulator
from simulator.cli import _parser, build_config
from simulator.config import DiskBus
from simulator.hotplug import BUSES, Hotplug, by_id_names, vpd_pg80
from tests.conftest import Database, Harness, NatsServer, stop_volumed, wait_for
from tests.test_devices_e2e import create_many, fake_tree, hotplugging, start
from tests.test_lifecycle import op

VOLUME = "3f2a9c4e-1b7d-4e2a-9f00-5c6d7e8f9a0b"
SERIAL = serial_of(VOLUME)  # "3f2a9c4e1b7d4e2a9f00"
PATTERNS = ("vd*", "sd*", "nvme*n*", "xvd*")
IDENTITY = {
    "virtio-blk": "virtio serial",
    "virtio-scsi": "serial from VPD page 0x80",
    "nvme": "NVMe controller serial",
    "xen": "exclusion",
}
FULL = os.environ.get("VOLUMED_BUSES_FULL") == "1"


# -- VPD page 0x80 ---------------------------------------------------------------------------


def test_vpd_pg80_as_qemu_answers_it() -> None:
    # QEMU's scsi-hd: type 0, page 0x80, length 20 in byte 3, the serial unpadded.
    page = bytes([0x00, 0x80, 0x00, 20]) + SERIAL.encode()
    assert vpd_pg80(SERIAL) == page
    assert vpd_pg80_serial(page) == SERIAL


@pytest.mark.parametrize(
    ("page", "serial"),
    [
        # A real drive right-justifies its serial in a fixed field (spaces first).
        (bytes([0x00, 0x80, 0x00, 12]) + b"    WD-WCC4N", "WD-WCC4N"),
        # ...or pads it after, with spaces or NULs.
        (bytes([0x00, 0x80, 0x00, 10]) + b"Z1X2Y3    ", "Z1X2Y3"),
        (bytes([0x00, 0x80, 0x00, 8]) + b"ABC\0\0\0\0\0", "ABC"),
        # The length is bytes 2-3 (SPC-3 on); what follows it is not the serial.
        (bytes([0x00, 0x80, 0x00, 3]) + b"ABCjunk", "ABC"),
        (bytes([0x00, 0x80, 0x01, 0x04]) + b"S" * 260, "S" * 260),
        # Not a serial: only padding, a page that is not 0x80, shorter than its header says,
        # no header at all.
        (bytes([0x00, 0x80, 0x00, 4]) + b"    ", None),
        (bytes([0x00, 0x83, 0x00, 3]) + b"ABC", None),
        (bytes([0x00, 0x80, 0x00, 20]) + b"3f2a9c4e", None),
        (b"\x00\x80", None),
        (b"", None),
    ],
)
def test_vpd_pg80_layouts(page: bytes, serial: str | None) -> None:
    assert vpd_pg80_serial(page) == serial


# -- reading each bus's tree -------------------------------------------------------------


def plugged(tmp_path: Path, bus: DiskBus, serials: bool = True) -> tuple[Path, Path, str]:
    """One 2 GiB disk of VOLUME hot-plugged on ``bus``; (sysfs, dev, its name)."""
    sysfs, dev = fake_tree(tmp_path)
    hotplug = Hotplug(sysfs, dev, bus=bus, serials=serials)
    hotplug.plug(VOLUME, 2 * GIB)
    return sysfs, dev, hotplug.devices[VOLUME]


def test_bus_of_names() -> None:
    assert [
        bus_of(n) for n in ("vdb", "sdaa", "nvme0n1", "nvme12n3", "xvdb", "nvme0", "loop0")
    ] == [
        "virtio-blk",
        "scsi",
        "nvme",
        "nvme",
        "xen",
        None,
        None,
    ]


@pytest.mark.parametrize("bus", BUSES)
def test_each_bus_is_read_where_it_keeps_its_serial(tmp_path: Path, bus: DiskBus) -> None:
    sysfs, dev, name = plugged(tmp_path, bus)
    block = sysfs / "block" / name
    devices = scan(str(sysfs), str(dev), PATTERNS)
    info = devices[name]
    assert info.size == 2 * GIB and info.path == str(dev / name)
    links = [str(dev / "disk" / "by-id" / link) for link in by_id_names(bus, SERIAL, "x")]
    if bus == "virtio-blk":
        assert name == "vdb" and (block / "serial").exists()
        assert (info.bus, info.serial_source, info.controller) == (
            "virtio-blk",
            "virtio",
            "virtio4",
        )
    elif bus == "virtio-scsi":
        # No serial file: the serial is in the SCSI device's VPD page 0x80.
        assert name == "sda" and not (block / "serial").exists()
        assert (block / "device" / "vpd_pg80").read_bytes()[1] == 0x80
        # Each disk its own SCSI address (all share the HBA's virtio device).
        assert (info.bus, info.serial_source, info.controller) == ("scsi", "vpd_pg80", "0:0:0:0")
        assert info.by_id_path == links[0]
        assert os.path.basename(links[0]) == f"scsi-0QEMU_QEMU_HARDDISK_{SERIAL}"
    elif bus == "nvme":
        # The namespace's device is its controller, whose serial is space-padded.
        assert name == "nvme0n1" and not (block / "serial").exists()
        assert os.path.realpath(block / "device").endswith("/nvme/nvme0")
        assert (block / "device" / "serial").read_text() == f"{SERIAL}\n"
        assert (info.bus, info.serial_source, info.controller) == (
            "nvme",
            "nvme_controller",
            "nvme0",
        )
        assert info.namespace_id is not None and info.namespace_id.startswith("eui.525400")
        # udev's model_serial link, not the eui one.
        assert info.by_id_path == links[0]
        assert os.path.basename(links[0]) == f"nvme-QEMU_NVMe_Ctrl_{SERIAL}"
        assert len(os.listdir(dev / "disk" / "by-id")) == 2
    else:
        assert name == "xvdb" and info.controller == "vbd-51728"
        assert (info.bus, info.serial, info.serial_source, info.by_id_path) == (
            "xen",
            None,
            None,
            None,
        )
        assert os.listdir(dev / "disk" / "by-id") == []
    if bus != "xen":
        assert info.serial == SERIAL
        assert info.by_id_path == links[0]
    assert identity_of(info) == (IDENTITY[bus] if bus != "xen" else "no serial")


@pytest.mark.parametrize("bus", ["virtio-scsi", "nvme"])
def test_without_serial_nothing_is_read(tmp_path: Path, bus: DiskBus) -> None:
    # QEMU without serial= offers no page 0x80 (the kernel then makes no vpd_pg80), and an
    # NVMe controller's serial may be blank.
    sysfs, dev, name = plugged(tmp_path, bus, serials=False)
    info = read_device(str(sysfs), str(dev), name)
    assert info is not None and info.serial is None and info.serial_source is None


def test_an_unreadable_vpd_page_is_neither_present_nor_absent(tmp_path: Path) -> None:
    sysfs, dev, name = plugged(tmp_path, "virtio-scsi")
    page = sysfs / "block" / name / "device" / "vpd_pg80"
    page.unlink()
    page.mkdir()  # reading it fails (EISDIR) as a failing read would, even for root
    with pytest.raises(Unreadable, match="vpd_pg80"):
        read_device(str(sysfs), str(dev), name)
    present, unreadable = scan_detailed(str(sysfs), str(dev), PATTERNS)
    assert name not in present and unreadable == {name}
    # A page that reads but is no serial: a device without one (never a wrong serial).
    page.rmdir()
    page.write_bytes(bytes([0x00, 0x80, 0x00, 40]) + b"3f2a")
    info = read_device(str(sysfs), str(dev), name)
    assert info is not None and info.serial is None


@pytest.mark.parametrize("bus", BUSES)
def test_a_resize_is_the_same_disk_on_each_bus(tmp_path: Path, bus: DiskBus) -> None:
    # The kernel's capacity change rewrites `size` only: serial, controller and name stay,
    # so the watcher reports a resize of the same disk, never a new one.
    sysfs, dev = fake_tree(tmp_path)
    hotplug = Hotplug(sysfs, dev, bus=bus)
    hotplug.plug(VOLUME, GIB)
    name = hotplug.devices[VOLUME]
    before = read_device(str(sysfs), str(dev), name)
    hotplug.resize(VOLUME, 3 * GIB)
    after = read_device(str(sysfs), str(dev), name)
    assert before is not None and after is not None and after.size == 3 * GIB
    assert diff_one(before, after) == [("changed", after)]


def test_the_simulator_cli_takes_a_bus() -> None:
    assert build_config(_parser().parse_args([])).bus == "virtio-blk"
    assert build_config(_parser().parse_args(["--bus", "virtio-scsi"])).bus == "virtio-scsi"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--bus", "ide"])


def test_by_id_prefers_the_link_made_from_the_serial() -> None:
    by_id = "/dev/disk/by-id/"
    scsi = [f"{by_id}wwn-0x5000c500a1b2c3d4", f"{by_id}scsi-0QEMU_QEMU_HARDDISK_{SERIAL}"]
    assert pick_by_id(scsi, SERIAL) == scsi[1]
    both = [
        f"{by_id}scsi-SQEMU_QEMU_HARDDISK_{SERIAL}",
        f"{by_id}scsi-0QEMU_QEMU_HARDDISK_{SERIAL}",
    ]
    assert pick_by_id(both, SERIAL) == both[1]
    nvme = [f"{by_id}nvme-eui.5254000000000001", f"{by_id}nvme-QEMU_NVMe_Ctrl_{SERIAL}"]
    assert pick_by_id(nvme, SERIAL) == nvme[1]
    assert pick_by_id([f"{by_id}virtio-{SERIAL}"], SERIAL) == f"{by_id}virtio-{SERIAL}"


# -- end to end: volumed against the simulator hot-plugging each bus ----------------------


@contextlib.asynccontextmanager
async def daemon(
    nats_server: NatsServer, database: Database, sim: Simulator, tree: tuple[Path, Path]
) -> AsyncIterator[Harness]:
    v = await start(nats_server, database, sim, *tree, devices=PATTERNS)
    try:
        yield v
    finally:
        await stop_volumed(v, v.task)  # type: ignore[attr-defined]


def simulating(bus: DiskBus, tree: tuple[Path, Path], seed: int) -> Simulator:
    return Simulator(replace(hotplugging(*tree, seed=seed, serials=True), bus=bus))


async def attach_all(
    v: Harness, sim: Simulator, volumes: list[str]
) -> dict[str, dict[str, object]]:
    """Attach every volume to the local VM at once; volume → its terminal event."""
    ops = {vol: op() for vol in volumes}
    for vol, o in ops.items():
        await v.send("attach", {"operation_id": o, "volume_id": vol, "vm_id": sim.local_vm_id})
    return {vol: await v.terminal(o, timeout=60) for vol, o in ops.items()}


def expect_attached(
    events: dict[str, dict[str, object]], sim: Simulator, bus: DiskBus, dev: Path
) -> None:
    """Each attach completed with its own device (the simulator's ground truth) and the
    by-id link udev makes from its serial (none on Xen)."""
    for vol, event in events.items():
        assert event["status"] == "completed", event
        assert event["device_path"] == str(dev / sim.devices[vol]), (event, sim.devices)
        links = by_id_names(bus, serial_of(vol))
        assert event["by_id_path"] == (str(dev / "disk" / "by-id" / links[0]) if links else None)


async def proven_rows(
    database: Database, sim: Simulator, ok: object
) -> dict[str, dict[str, object]]:
    async def check() -> dict[str, dict[str, object]] | None:
        rows = await database.query(
            "SELECT * FROM device_mappings WHERE vm_id = %s", sim.local_vm_id
        )
        by_volume = {str(r["volume_id"]): r for r in rows}
        return by_volume if ok(by_volume) else None  # type: ignore[operator]

    return await wait_for(check, 20)  # type: ignore[no-any-return]


@pytest.mark.parametrize("bus", BUSES)
async def test_lifecycle_and_reboot_on_each_bus(
    nats_server: NatsServer, database: Database, tmp_path: Path, bus: DiskBus
) -> None:
    tree = fake_tree(tmp_path)
    dev = tree[1]
    async with simulating(bus, tree, seed=40 + BUSES.index(bus)) as sim:
        async with daemon(nats_server, database, sim, tree) as v:
            volumes = await create_many(v, sim, 3, [1])
            expect_attached(await attach_all(v, sim, volumes), sim, bus, dev)
            # Each mapping says which identity proved it.
            rows = await proven_rows(
                database,
                sim,
                lambda rows: len(rows) == 3 and all(r["proof"] for r in rows.values()),
            )
            for vol in volumes:
                row = rows[vol]
                assert row["device_path"] == str(dev / sim.devices[vol])
                assert row["proof"] == ("exclusive" if bus == "xen" else "serial")
                assert IDENTITY[bus] in str(row["proof_reason"]), row
            reply, code = await v.query("mapping", {"volume_id": volumes[0]})
            assert code is None and IDENTITY[bus] in str(reply["proof_reason"])

        # The guest reboots: the kernel names the same disks in another order.
        after = {vol: str(dev / name) for vol, name in sim.hotplug.reboot().items()}
        async with daemon(nats_server, database, sim, tree) as v:
            if bus == "xen":
                # No serial: nothing tells same-size disks apart after a reboot, so the
                # mappings name no device rather than a wrong one.
                rows = await proven_rows(
                    database, sim, lambda rows: all(r["proof"] == "none" for r in rows.values())
                )
                assert all(r["device_path"] is None for r in rows.values())
            else:
                rows = await proven_rows(
                    database,
                    sim,
                    lambda rows: all(rows[vol]["device_path"] == after[vol] for vol in volumes),
                )
                for vol in volumes:
                    assert rows[vol]["proof"] == "serial"
                    links = by_id_names(bus, serial_of(vol))
                    assert rows[vol]["by_id_path"] == str(dev / "disk" / "by-id" / links[0])

            # Detach (the device goes, and the mapping with it), then delete.
            gone = volumes[0]
            d = op()
            await v.send("detach", {"operation_id": d, "volume_id": gone})
            event = await v.terminal(d, timeout=30)
            assert event["status"] == "completed", event
            assert gone not in sim.devices and not os.path.exists(after[gone])
            await proven_rows(database, sim, lambda rows: gone not in rows)
            x = op()
            await v.send("delete", {"operation_id": x, "volume_id": gone})
            assert (await v.terminal(x, timeout=30))["status"] == "completed"
            assert gone not in sim.volumes


@pytest.mark.parametrize("bus", ["virtio-scsi", "nvme"] if FULL else ["virtio-scsi"])
async def test_twenty_concurrent_attaches_take_the_serial_path(
    nats_server: NatsServer, database: Database, tmp_path: Path, bus: DiskBus
) -> None:
    tree = fake_tree(tmp_path)
    dev = tree[1]
    async with (
        simulating(bus, tree, seed=50 + BUSES.index(bus)) as sim,
        daemon(nats_server, database, sim, tree) as v,
    ):
        volumes = await create_many(v, sim, 20, [1])  # one size: exclusion could prove none
        expect_attached(await attach_all(v, sim, volumes), sim, bus, dev)
        rows = await proven_rows(
            database, sim, lambda rows: len(rows) == 20 and all(r["proof"] for r in rows.values())
        )
        for vol in volumes:
            assert rows[vol]["proof"] == "serial", rows[vol]
            assert IDENTITY[bus] in str(rows[vol]["proof_reason"])
            assert rows[vol]["device_path"] == str(dev / sim.devices[vol])
        assert len({r["device_path"] for r in rows.values()}) == 20


def test_the_demo_shows_a_virtio_scsi_disk(tmp_path: Path) -> None:
    # A process of its own: the demo sets up logging and signal handlers for its process.
    done = subprocess.run(
        [sys.executable, "-m", "actors.cli", "demo", "--once", "--bus", "virtio-scsi"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"attach  completed  device \S+/guest/dev/sda$", out, re.M), out
    assert "(serial from VPD page 0x80)" in out and "scsi-0QEMU_QEMU_HARDDISK_" in out
    assert "proof serial: sda carries the volume's serial" in out
