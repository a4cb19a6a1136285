"""The device watcher: pure sysfs/uevent/diff parts, then the actor against a real
nats-server, on a fake sysfs tree and on real kernel loop devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from actors.watcher import WatcherActor, diff, diff_one, parse_uevent, read_device, scan, sysfs
from actors.watcher.sysfs import pick_by_id, scan_detailed
from bus import Bus
from bus.topology import DEVICES_BUCKET, HEALTH_BUCKET, TOPOLOGY, device_subject
from schemas.config import Settings
from schemas.devices import DeviceEvent, DeviceInfo, DeviceSnapshot
from schemas.internal import Heartbeat
from tests.conftest import NatsServer, wait_for

MiB = 1024 * 1024
VM = "vm-1"


class FakeHost:
    """A sysfs and /dev tree in a temporary directory, shaped like a KVM guest's."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        (self.sys / "block").mkdir(parents=True)
        (self.dev / "disk" / "by-id").mkdir(parents=True)

    def add(
        self,
        name: str,
        size: int,
        serial: str | None = None,
        controller: str | None = "virtio5",
        link: str | None = "virtio",
    ) -> None:
        block = self.sys / "block" / name
        block.mkdir()
        if serial is not None:
            (block / "serial").write_text(serial)  # no trailing newline, as virtio_blk
        if controller:
            target = self.sys / "devices" / "pci0000:00" / "0000:00:07.0" / controller
            target.mkdir(parents=True, exist_ok=True)
            (block / "device").symlink_to(os.path.relpath(target, block))
        (self.dev / name).touch()
        if serial and link:
            (self.dev / "disk" / "by-id" / f"{link}-{serial}").symlink_to(f"../../{name}")
        # Written last: a device is present once it has a size (as the kernel does).
        (block / "size").write_text(f"{size // 512}\n")

    def remove(self, name: str) -> None:
        shutil.rmtree(self.sys / "block" / name)
        (self.dev / name).unlink()
        for link in (self.dev / "disk" / "by-id").iterdir():
            if os.readlink(link) == f"../../{name}":
                link.unlink()

    def settings(self, **kw: object) -> Settings:
        return Settings(sysfs=str(self.sys), dev=str(self.dev), **kw)  # type: ignore[arg-type]


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "test-watcher")
    await b.provision(TOPOLOGY)
    yield b
    await b.close()


@dataclass
class Events:
    """Every DeviceEvent published for the VM, in order."""

    items: list[DeviceEvent] = field(default_factory=list)

    def of(self, name: str) -> list[tuple[str, str]]:
        return [(e.kind, e.source) for e in self.items if e.device and e.device.name == name]

    def device(self, name: str, kind: str) -> DeviceInfo:
        found = [e.device for e in self.items if e.kind == kind and e.device]
        return next(d for d in found if d.name == name)


@pytest.fixture
async def events(bus: Bus) -> AsyncIterator[Events]:
    got = Events()
    decoder = msgspec.json.Decoder(DeviceEvent)

    async def handler(subject: str, data: bytes, reply: str | None) -> None:
        got.items.append(decoder.decode(data))

    unsubscribe = await bus.subscribe(device_subject(VM), handler)
    yield got
    await unsubscribe()


@contextlib.asynccontextmanager
async def running(actor: WatcherActor) -> AsyncIterator[WatcherActor]:
    task = asyncio.create_task(actor.run())
    try:
        await asyncio.wait_for(actor.ready.wait(), 5)
        yield actor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- pure parts -------------------------------------------------------------------------------


def test_scan_reads_size_serial_controller_and_by_id(host: FakeHost) -> None:
    host.add("vdb", 5 * 1024 * MiB, serial="0123456789abcdef0123", controller="virtio4")
    host.add("vdc", 64 * MiB)  # no serial, no link
    host.add("vdd", 0, serial="empty")  # no media: not present
    host.add("sda", 64 * MiB, serial="scsi1")  # not matching vd*
    host.add("vde", 8 * MiB, serial="s2", link="scsi-0QEMU_QEMU_HARDDISK")
    # A partition's link never names the disk.
    (host.dev / "disk" / "by-id" / "virtio-x-part1").symlink_to("../../vdb1")
    found = scan(str(host.sys), str(host.dev), ("vd*",))
    assert sorted(found) == ["vdb", "vdc", "vde"]
    vdb = found["vdb"]
    assert vdb.size == 5 * 1024 * MiB and vdb.serial == "0123456789abcdef0123"
    assert vdb.path == f"{host.dev}/vdb" and vdb.controller == "virtio4"
    assert vdb.by_id_path == f"{host.dev}/disk/by-id/virtio-0123456789abcdef0123"
    assert found["vdc"].serial is None and found["vdc"].by_id_path is None
    assert found["vde"].by_id_path == f"{host.dev}/disk/by-id/scsi-0QEMU_QEMU_HARDDISK-s2"
    # Whitespace-only serial is no serial; a vanished device is absent, not an error.
    (host.sys / "block" / "vdc" / "serial").write_text("  \n")
    assert read_device(str(host.sys), str(host.dev), "vdc").serial is None  # type: ignore[union-attr]
    assert read_device(str(host.sys), str(host.dev), "vdz") is None
    with pytest.raises(OSError):
        scan(str(host.sys / "missing"), str(host.dev), ("vd*",))
    # Present but unreadable is neither present nor absent: a watcher keeps what it knew.
    (host.sys / "block" / "vdc" / "size").write_text("garbage")
    found, unreadable = scan_detailed(str(host.sys), str(host.dev), ("vd*",))
    assert sorted(found) == ["vdb", "vde"] and unreadable == {"vdc"}


def test_by_id_preference() -> None:
    links = ["/d/scsi-0QEMU_x", "/d/wwn-0x5", "/d/virtio-other", "/d/virtio-SER"]
    assert pick_by_id(links, "SER") == "/d/virtio-SER"
    assert pick_by_id(links[:3], "SER") == "/d/virtio-other"
    assert pick_by_id(links[:2], None) == "/d/scsi-0QEMU_x"
    assert pick_by_id([], "SER") is None


def test_a_link_being_made_is_no_by_id_link(tmp_path: Path) -> None:
    """udev (and the simulator) write ``.<link>.<random>`` and then rename it: caught in
    between, the temporary name is never reported as the device's by-id path."""
    by_id = tmp_path / "disk" / "by-id"
    by_id.mkdir(parents=True)
    os.symlink("../../vdb", by_id / ".virtio-SER.x1y2")
    assert sysfs.by_id_links(str(tmp_path)) == {}
    os.symlink("../../vdb", by_id / "virtio-SER")
    assert sysfs.by_id_links(str(tmp_path)) == {"vdb": [str(by_id / "virtio-SER")]}


def test_parse_uevent() -> None:
    raw = (
        b"change@/devices/virtual/block/loop3\0ACTION=change\0DEVPATH=/devices/virtual/block/"
        b"loop3\0SUBSYSTEM=block\0DEVNAME=loop3\0DEVTYPE=disk\0DISKSEQ=13\0SEQNUM=819\0"
    )
    event = parse_uevent(raw)
    assert event is not None and event.is_block_disk
    assert (event.action, event.name, event.env["SEQNUM"]) == ("change", "loop3", "819")
    part = parse_uevent(
        b"add@/devices/pci0000:00/0000:00:07.0/virtio4/block/vdb/vdb1\0ACTION=add\0"
        b"SUBSYSTEM=block\0DEVTYPE=partition\0"
    )
    assert part is not None and part.name == "vdb1" and not part.is_block_disk
    assert parse_uevent(b"libudev\0\xfe\xed\xca\xfe\0") is None
    assert parse_uevent(b"") is None


def test_diff() -> None:
    a = DeviceInfo(name="vdb", path="/dev/vdb", size=10, serial="s1")
    assert diff_one(None, a) == [("added", a)]
    assert diff_one(a, None) == [("removed", a)]
    assert diff_one(a, a) == []
    # A resize (same name, serial, controller) is a change of the same disk.
    bigger = msgspec.structs.replace(a, size=20)
    assert diff_one(a, bigger) == [("changed", bigger)]
    # Another serial or controller under the name: it went and another came.
    other = msgspec.structs.replace(a, size=20, serial="s2")
    assert diff_one(a, other) == [("removed", a), ("added", other)]
    moved = msgspec.structs.replace(a, size=20, controller="virtio9")
    assert diff_one(a, moved) == [("removed", a), ("added", moved)]
    linked = msgspec.structs.replace(a, by_id_path="/dev/disk/by-id/virtio-s1", appeared_at=5.0)
    assert diff_one(a, linked) == [("updated", linked)]
    c = DeviceInfo(name="vdc", path="/dev/vdc", size=10)
    d = DeviceInfo(name="vdd", path="/dev/vdd", size=10)
    replaced = msgspec.structs.replace(d, size=20, serial="s2")
    assert diff({"vdb": a, "vdd": d}, {"vdb": bigger, "vdc": c, "vdd": replaced}) == [
        ("removed", d),
        ("changed", bigger),
        ("added", c),
        ("added", replaced),
    ]


# -- the actor on a fake tree -----------------------------------------------------------------


async def test_fake_tree_inventory_then_added_and_removed_once(
    host: FakeHost, bus: Bus, events: Events
) -> None:
    host.add("vda", 20 * 1024 * MiB, serial="root")
    host.add("vdz", 0)  # empty: ignored
    host.add("sdb", 8 * MiB, serial="other")  # not watched
    settings = host.settings(devices=("vd*",), poll_interval=0.05)
    actor = WatcherActor(bus, settings, VM, "t1", heartbeat_interval=0.1)
    async with running(actor):
        inventory = await wait_for(lambda: [e for e in events.items if e.kind == "inventory"])
        assert [d.name for d in inventory[0].devices] == ["vda"]
        assert inventory[0].source == "start" and inventory[0].watcher == "t1"
        assert not actor.uevents_active  # a fake sysfs is never the kernel's

        host.add("vdb", 64 * MiB, serial="0f1e2d3c4b5a69788796", controller="virtio6")
        await wait_for(lambda: events.of("vdb"))
        added = events.device("vdb", "added")
        assert events.of("vdb") == [("added", "rescan")]
        assert added.size == 64 * MiB and added.serial == "0f1e2d3c4b5a69788796"
        assert added.by_id_path == f"{host.dev}/disk/by-id/virtio-0f1e2d3c4b5a69788796"
        assert added.controller == "virtio6" and added.appeared_at > inventory[0].at

        host.remove("vdb")
        await wait_for(lambda: len(events.of("vdb")) == 2)
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 10)  # many scans, nothing new
        assert events.of("vdb") == [("added", "rescan"), ("removed", "rescan")]
        assert [e.kind for e in events.items] == ["inventory", "added", "removed"]
        assert actor.events_published == 3 and sorted(actor.known) == ["vda"]

        # The devices bucket follows; the heartbeat says how the watcher works.
        snapshots = await bus.bucket(DEVICES_BUCKET, DeviceSnapshot)
        snap = await wait_for(lambda: snapshots.get(VM))
        assert [d.name for d in snap[0].devices] == ["vda"]
        health = await bus.bucket(HEALTH_BUCKET, Heartbeat)
        beat = await wait_for(lambda: health.get("watcher.t1"))
        check = beat[0].checks["device_watcher"]
        assert check.status == "ok" and check.detail.startswith("rescan only")
        assert "1 devices" in check.detail


async def test_fake_tree_replaced_between_scans_is_remove_and_add(
    host: FakeHost, bus: Bus, events: Events
) -> None:
    host.add("vdb", 64 * MiB, serial="first")
    actor = WatcherActor(bus, host.settings(poll_interval=0.05), VM, "t2")
    async with running(actor):
        await wait_for(lambda: events.items)
        host.remove("vdb")  # no await between: no scan can see the gap
        host.add("vdb", 128 * MiB, serial="second")
        await wait_for(lambda: len(events.of("vdb")) == 2)
        assert events.of("vdb") == [("removed", "rescan"), ("added", "rescan")]
        assert events.device("vdb", "removed").serial == "first"
        assert events.device("vdb", "added").size == 128 * MiB
        assert actor.known["vdb"].serial == "second"
        # A read that fails (not "gone") changes nothing: no remove, no re-add later.
        (host.sys / "block" / "vdb" / "size").write_text("garbage")
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 3)
        (host.sys / "block" / "vdb" / "size").write_text(f"{128 * MiB // 512}\n")
        await wait_for(lambda: actor.rescans >= rescans + 6)
        assert len(events.of("vdb")) == 2 and actor.known["vdb"].serial == "second"


async def test_cancel_always_ends_run(host: FakeHost, bus: Bus) -> None:
    """Cancelling while a publish or a KV write is in flight ends run() (nats-py's requests
    can swallow a cancel on Python 3.11)."""
    settings = host.settings(poll_interval=0.01)
    for i in range(30):
        actor = WatcherActor(bus, settings, VM, f"c{i}", heartbeat_interval=0.01)
        task = asyncio.create_task(actor.run())
        await actor.ready.wait()
        host.add(f"vd{i}", MiB)
        await asyncio.sleep(0.001 * (i % 7))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done, f"run() ignored its cancellation (round {i})"


async def test_unreadable_sysfs_is_down_not_empty(tmp_path: Path, bus: Bus, events: Events) -> None:
    settings = Settings(sysfs=str(tmp_path / "absent"), dev=str(tmp_path), poll_interval=0.05)
    actor = WatcherActor(bus, settings, VM, "t3")
    task = asyncio.create_task(actor.run())
    try:
        await wait_for(lambda: actor.check().status == "down")
        assert "no successful sysfs scan" in actor.check().detail
        assert events.items == []  # never claims "no devices"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- when a disk appeared: the kernel's announcement, never the read that saw it ------------


async def test_a_disk_unreadable_at_start_keeps_its_start_time(
    host: FakeHost, bus: Bus, events: Events
) -> None:
    """A disk there at the start scan but unreadable then is announced once readable as
    present "before the watcher started", never ``added`` with a fresh time."""
    host.add("vda", 64 * MiB)
    host.add("vdb", 64 * MiB)
    host.add("vdc", 64 * MiB)
    for name in ("vdb", "vdc"):  # reading them fails (EISDIR): they exist, unreadable now
        (host.sys / "block" / name / "size").unlink()
        (host.sys / "block" / name / "size").mkdir()
    size = host.sys / "block" / "vdb" / "size"
    actor = WatcherActor(bus, host.settings(poll_interval=0.05), VM, "t4")
    async with running(actor):
        start = await wait_for(lambda: [e for e in events.items if e.kind == "inventory"])
        vda = start[0].devices[0]
        assert [d.name for d in start[0].devices] == ["vda"]
        assert start[0].unread == ("vdb", "vdc")
        assert (vda.appeared_after, vda.appeared_at) == (0.0, start[0].at)
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 2)
        assert events.of("vdb") == events.of("vdc") == []
        size.rmdir()
        size.write_text(f"{64 * MiB // 512}\n")
        await wait_for(lambda: events.of("vdb"))
        assert events.of("vdb") == [("added", "start")]
        vdb = events.device("vdb", "added")
        assert (vdb.appeared_after, vdb.appeared_at) == (0.0, start[0].at)
        assert actor.known["vdb"] == vdb
        # One that goes before it could be read is removed: no reader keeps it as there.
        host.remove("vdc")
        await wait_for(lambda: events.of("vdc"))
        assert events.of("vdc") == [("removed", "rescan")]
        assert "vdc" not in actor.known


async def test_a_settle_re_read_is_stamped_between_its_uevent_and_the_read(
    host: FakeHost, bus: Bus, events: Events
) -> None:
    """A disk that the re-read after a uevent finds (not the read at once) may have come any
    time in between: never stamped with that earlier uevent's arrival alone."""
    actor = WatcherActor(bus, host.settings(poll_interval=600), VM, "t5")
    async with running(actor):
        uevent = time.time()
        assert actor.observe("vdb", "uevent", uevent) == []  # nothing there yet
        host.add("vdb", 64 * MiB, serial=None)
        came = time.time()
        actor._settle("vdb", uevent)
        await wait_for(lambda: events.of("vdb"))
        added = events.device("vdb", "added")
        assert added.appeared_after == uevent and added.appeared_at >= came


async def test_a_rescan_stamps_a_disk_between_the_previous_scan_and_its_end(
    host: FakeHost, bus: Bus, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that comes while a rescan runs is stamped no earlier than it came (the time
    before the scan would be), and no later than the previous scan that missed it began."""
    actor = WatcherActor(bus, host.settings(poll_interval=600), VM, "t6")
    async with running(actor):
        came: list[float] = []
        listing = sysfs.block_names

        def block_names(root: str, patterns: Sequence[str]) -> list[str]:
            if not came:  # the disk comes just as the scan begins
                host.add("vdb", 64 * MiB, serial=None)
                came.append(time.time())
            return listing(root, patterns)

        monkeypatch.setattr(sysfs, "block_names", block_names)
        before = time.time()
        assert [kind for kind, _ in actor.rescan()] == ["added"]
        await wait_for(lambda: events.of("vdb"))
        added = events.device("vdb", "added")
        assert added.appeared_after <= before and added.appeared_at >= came[0]


async def test_a_slow_by_id_link_holds_up_only_its_own_disk(
    host: FakeHost, bus: Bus, events: Events
) -> None:
    actor = WatcherActor(bus, host.settings(poll_interval=0.05), VM, "t7", by_id_grace=60)
    async with running(actor):
        await wait_for(lambda: events.items)
        host.add("vdb", 64 * MiB, serial="slow", link=None)  # udev has not linked it yet
        await wait_for(lambda: "vdb" in actor.known)
        host.add("vdc", 64 * MiB, serial="fast")
        await wait_for(lambda: events.of("vdc"), timeout=5)
        assert events.of("vdb") == []  # still waiting for its link, alone
        host.remove("vdc")
        await wait_for(lambda: len(events.of("vdc")) == 2, timeout=5)
        (host.dev / "disk" / "by-id" / "virtio-slow").symlink_to("../../vdb")
        await wait_for(lambda: events.of("vdb"), timeout=5)
        assert events.device("vdb", "added").by_id_path == f"{host.dev}/disk/by-id/virtio-slow"
        assert [e.device.name for e in events.items if e.device] == ["vdc", "vdc", "vdb"]


# -- real kernel block devices ----------------------------------------------------------------


class Loops:
    """Loop devices on a sparse file; every one attached is detached at the end."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.attached: list[str] = []

    async def attach(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            "losetup", "--find", "--show", str(self.image), stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        path = out.decode().strip()
        self.attached.append(path)
        return path

    async def detach(self, path: str) -> None:
        proc = await asyncio.create_subprocess_exec("losetup", "-d", path)
        assert await proc.wait() == 0
        self.attached.remove(path)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    image = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    made = Loops(image)
    try:
        yield made
    finally:
        for path in made.attached:
            subprocess.run(["losetup", "-d", path], check=False)


def kernel_settings(poll_interval: float) -> Settings:
    return Settings(sysfs="/sys", dev="/dev", devices=("loop*",), poll_interval=poll_interval)


@pytest.mark.loopdev
async def test_loop_device_seen_through_uevents(loops: Loops, bus: Bus, events: Events) -> None:
    actor = WatcherActor(bus, kernel_settings(poll_interval=0.3), VM, "k1")
    async with running(actor):
        assert actor.uevents_active, actor.uevent_problem
        await wait_for(lambda: events.items)
        before = time.time()
        path = await loops.attach()
        name = os.path.basename(path)
        await wait_for(lambda: events.of(name), timeout=5)
        added = events.device(name, "added")
        assert events.of(name) == [("added", "uevent")]
        assert added.size == 64 * MiB and added.path == path and added.serial is None
        # When the kernel announced it: its uevent's arrival, exactly (both bounds).
        assert before <= added.appeared_after == added.appeared_at <= time.time()
        await loops.detach(path)
        await wait_for(lambda: len(events.of(name)) == 2, timeout=5)
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 2)  # reconciliation adds nothing
        assert events.of(name) == [("added", "uevent"), ("removed", "uevent")]
        assert actor.uevents_matched >= 2 and name not in actor.known
        assert actor.check().detail.startswith("uevents + rescan")


@pytest.mark.loopdev
async def test_loop_device_present_at_start_appeared_before_the_watcher_started(
    loops: Loops, bus: Bus, events: Events
) -> None:
    path = await loops.attach()
    name = os.path.basename(path)
    actor = WatcherActor(bus, kernel_settings(poll_interval=0.3), VM, "k4")
    async with running(actor):
        start = await wait_for(lambda: events.items)
        listed = {d.name: d for d in start[0].devices}[name]
        assert (listed.appeared_after, listed.appeared_at) == (0.0, start[0].at)
        assert actor.known[name] == listed  # kept as long as it is the same disk


@pytest.mark.loopdev
async def test_loop_device_seen_through_rescans(loops: Loops, bus: Bus, events: Events) -> None:
    actor = WatcherActor(bus, kernel_settings(poll_interval=0.1), VM, "k2", use_uevents=False)
    async with running(actor):
        assert not actor.uevents_active
        await wait_for(lambda: events.items)
        before = time.time()
        path = await loops.attach()
        after = time.time()
        name = os.path.basename(path)
        await wait_for(lambda: events.of(name), timeout=5)
        added = events.device(name, "added")
        assert added.size == 64 * MiB
        # Unannounced: it appeared in [before, after]; the interval must hold that moment:
        # from the start of a scan that did not see it (which may begin while losetup runs)
        # to the end of the one that did.
        assert 0 < added.appeared_after <= after
        assert before <= added.appeared_at
        assert added.appeared_after <= added.appeared_at
        await loops.detach(path)
        await wait_for(lambda: len(events.of(name)) == 2, timeout=5)
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 3)
        assert events.of(name) == [("added", "rescan"), ("removed", "rescan")]
        assert actor.uevents_seen == 0


@pytest.mark.loopdev
@pytest.mark.parametrize("use_uevents", [True, False])
async def test_resized_loop_device_is_one_changed_event(
    loops: Loops, bus: Bus, events: Events, use_uevents: bool
) -> None:
    """A disk that changes size (truncate + ``losetup -c``) is the same disk: one ``changed``
    event with the new size, never removed + added."""
    actor = WatcherActor(bus, kernel_settings(poll_interval=0.1), VM, "k3", use_uevents=use_uevents)
    async with running(actor):
        await wait_for(lambda: events.items)
        path = await loops.attach()
        name = os.path.basename(path)
        await wait_for(lambda: events.of(name), timeout=5)
        added = events.device(name, "added")
        os.truncate(loops.image, 128 * MiB)
        proc = await asyncio.create_subprocess_exec("losetup", "-c", path)
        assert await proc.wait() == 0
        await wait_for(lambda: len(events.of(name)) >= 2, timeout=5)
        rescans = actor.rescans
        await wait_for(lambda: actor.rescans >= rescans + 3)  # and nothing more comes
        source = "uevent" if use_uevents else "rescan"
        assert events.of(name) == [("added", source), ("changed", source)]
        changed = events.device(name, "changed")
        assert changed.size == 128 * MiB
        assert changed.appeared_at == added.appeared_at  # the same disk, seen since then
        assert actor.known[name].size == 128 * MiB
