"""Fake block devices: what a guest kernel and udev show when a volume is hot-plugged.

Each bus is laid out as the kernel and udev lay it out (``bus``), the volume's serial where
QEMU puts CloudStack's ``serial=`` (the volume id without dashes, cut to 20):

- ``virtio-blk``: ``<sysfs>/block/vdX/{size,serial}``, ``device`` a relative link to the
  disk's own virtio device ``<sysfs>/devices/pci0000:00/0000:00:NN.0/virtioN``; the link
  ``<dev>/disk/by-id/virtio-<serial>``.
- ``virtio-scsi``: ``<sysfs>/block/sdX/size`` and no ``serial`` file; ``device`` links to the
  SCSI device ``.../virtio2/host0/target0:0:0/0:0:0:<lun>`` of the one HBA, which holds
  ``vpd_pg80`` (the binary VPD page 0x80: a 4-byte header, byte 3 the length, then the
  serial), ``vendor`` and ``model``; the link ``scsi-0QEMU_QEMU_HARDDISK_<serial>``.
- ``nvme``: one controller per disk (as QEMU hot-plugs ``-device nvme,serial=``):
  ``<sysfs>/block/nvme<C>n1/{size,wwid,eui}`` with ``device`` linking to the controller
  ``.../0000:00:NN.0/nvme/nvme<C>`` and its ``serial`` and ``model`` (space-padded as the
  kernel prints them); the links ``nvme-QEMU_NVMe_Ctrl_<serial>`` and ``nvme-eui.<eui>``.
- ``xen``: ``<sysfs>/block/xvdX/size`` from ``xvdb`` (a Xen guest's root disk is ``xvda``),
  ``device`` linking to ``<sysfs>/devices/vbd-<n>``, the disk's Xen device number (xvdb:
  51728); no serial and no by-id link.

Every bus has the node ``<dev>/<name>``. The name is the lowest free one, unrelated to
CloudStack's deviceid, as in a real guest. Each sysfs directory is built aside and renamed
into place, so a scanner never sees a device without its ``size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from simulator.config import DiskBus

log = logging.getLogger(__name__)

SECTOR = 512
SERIAL_LENGTH = 20
_WORKDIR = ".simulator"
_FIRST_VIRTIO = 4
"""virtio0..3 are the guest's NIC, console, balloon and root disk."""
_FIRST_NVME_SLOT = 0x10
"""PCI slots of NVMe controllers start here (virtio disks take the low ones)."""
_SCSI_HBA = os.path.join("devices", "pci0000:00", "0000:00:03.0", "virtio2", "host0")
"""The virtio-scsi HBA every SCSI disk hangs off (CloudStack's one controller per VM)."""
_XEN_VBD_BASE = 51712
"""Xen's device number of xvda (202 << 8); xvdb is 51728, and so on in steps of 16."""
SCSI_VENDOR = "QEMU"
SCSI_MODEL = "QEMU HARDDISK"
NVME_MODEL = "QEMU NVMe Ctrl"

BUSES: tuple[DiskBus, ...] = get_args(DiskBus)


def _letters(index: int) -> str:
    letters = ""
    while index >= 0:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26 - 1
    return letters


def disk_name(index: int, bus: DiskBus = "virtio-blk") -> str:
    """The kernel's name of the index-th disk of a bus: vda..vdz, vdaa.. (virtio-blk),
    sda.. (SCSI), xvda.. (Xen), nvme0n1, nvme1n1.. (one namespace per NVMe controller)."""
    if bus == "nvme":
        return f"nvme{index}n1"
    prefix = {"virtio-blk": "vd", "virtio-scsi": "sd", "xen": "xvd"}[bus]
    return prefix + _letters(index)


def vpd_pg80(serial: str) -> bytes:
    """SCSI VPD page 0x80 as QEMU's scsi-hd answers it and the kernel exposes it in
    ``device/vpd_pg80``: peripheral type 0 (disk), page code 0x80, a 2-byte page length,
    then the serial as given (QEMU neither pads it nor cuts a 20-character one)."""
    data = serial.encode("ascii")
    return bytes((0x00, 0x80)) + len(data).to_bytes(2, "big") + data


def by_id_names(bus: DiskBus, serial: str | None, eui: str | None = None) -> list[str]:
    """The links udev makes in ``disk/by-id`` for a disk of this bus (none without serial)."""
    if serial is None:
        return []
    if bus == "virtio-blk":
        return [f"virtio-{serial}"]
    if bus == "virtio-scsi":
        # scsi_id's "0" (vendor specific) id: vendor, model, then the VPD 0x80 serial.
        return [f"scsi-0{SCSI_VENDOR}_{SCSI_MODEL.replace(' ', '_')}_{serial}"]
    if bus == "nvme":
        names = [f"nvme-{NVME_MODEL.replace(' ', '_')}_{serial}"]
        return names + ([f"nvme-eui.{eui}"] if eui else [])
    return []  # Xen: no serial, no link


@dataclass
class _Plugged:
    """What one volume's device is made of, beyond its block directory."""

    links: list[str]
    """Names in <dev>/disk/by-id that point at the device."""
    remove: Path | None
    """The device directory under <sysfs>/devices to remove when it goes."""


def serial_of(volume_id: str) -> str:
    """The serial CloudStack gives a KVM disk: the volume id without dashes, cut to 20."""
    return volume_id.replace("-", "")[:SERIAL_LENGTH]


def make_guest_tree(sysfs_root: str | Path, dev_root: str | Path, root_disk_bytes: int) -> None:
    """A guest's device tree before any attach: its root disk ``vda`` (which has no serial
    and is not a volume volumed made) and an empty ``disk/by-id``. Hot-plugged disks then
    take ``vdb``, ``vdc``... as in a real guest."""
    root = Path(sysfs_root) / "block" / disk_name(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "size").write_text(f"{root_disk_bytes // SECTOR}\n")
    dev = Path(dev_root)
    (dev / "disk" / "by-id").mkdir(parents=True, exist_ok=True)
    (dev / disk_name(0)).touch()


class Hotplug:
    """Makes and removes the fake devices of volumes attached to the local VM."""

    def __init__(
        self,
        sysfs_root: str | Path | None,
        dev_root: str | Path | None,
        *,
        serials: bool = True,
        hotplug_delay: float = 0.0,
        unplug_delay: float = 0.0,
        bus: DiskBus = "virtio-blk",
    ) -> None:
        self.sysfs_root = Path(sysfs_root) if sysfs_root is not None else None
        self.dev_root = Path(dev_root) if dev_root is not None else None
        self.bus: DiskBus = bus
        # Xen's blkfront has no serial whatever the hypervisor was told.
        self.serials = serials and bus != "xen"
        self.hotplug_delay = hotplug_delay
        self.unplug_delay = unplug_delay
        self.devices: dict[str, str] = {}
        """volume id -> device name, for the devices present now."""
        self.plugged: list[tuple[str, str]] = []
        """(volume id, device name) of every device made, oldest first: which device a
        volume had, after it has gone (a name is used again once free)."""
        self._parts: dict[str, _Plugged] = {}
        """volume id -> its by-id links and device directory."""
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def enabled(self) -> bool:
        return self.sysfs_root is not None or self.dev_root is not None

    def prepare(self) -> None:
        """Make the guest's ``block`` directory and /dev, as any machine has them before
        its first disk: a watcher started on an empty tree (README, "To try it by hand")
        then scans nothing instead of failing, and counts the first disk hot-plugged as
        one that appeared while it watched, not as one already there at its start (which
        a serial-less attach in flight could never be proven to be)."""
        if self.sysfs_root is not None:
            (self.sysfs_root / "block").mkdir(parents=True, exist_ok=True)
        if self.dev_root is not None:
            self.dev_root.mkdir(parents=True, exist_ok=True)

    def pending(self) -> int:
        return len(self._timers)

    def last_deadline(self) -> float | None:
        """Loop time of the last pending device change; None when none is pending."""
        return max((t.when() for t in self._timers.values()), default=None)

    def plug(self, volume_id: str, size: int) -> None:
        """A volume of ``size`` bytes was attached: its device appears after hotplug_delay."""
        if not self.enabled:
            return
        self._settle(volume_id)
        self._later(self.hotplug_delay, volume_id, self._plug_now, volume_id, size)

    def unplug(self, volume_id: str) -> None:
        """A volume was detached: its device goes after unplug_delay."""
        if not self.enabled:
            return
        timer = self._timers.pop(volume_id, None)
        if timer is not None:
            # Detached before its device appeared: it never will.
            timer.cancel()
            return
        if volume_id in self.devices:
            self._later(self.unplug_delay, volume_id, self._unplug_now, volume_id)

    def resize(self, volume_id: str, size: int) -> None:
        """The kernel's capacity change: the device's size file is replaced in one step."""
        name = self.devices.get(volume_id)
        if name is None or self.sysfs_root is None:
            return
        tmp = self._workdir() / f"size.{uuid.uuid4().hex}"
        try:
            tmp.write_text(f"{size // SECTOR}\n")
            os.replace(tmp, self.sysfs_root / "block" / name / "size")
        finally:
            self._tidy()

    def reboot(self, order: list[str] | None = None) -> dict[str, str]:
        """The guest rebooted: the kernel names the disks again, here the volumes in
        ``order`` (default: the reverse of their names now) take the same names in turn.
        Serials, controllers and by-id links stay with their disk. Returns volume → name."""
        if self.sysfs_root is None or self.dev_root is None:
            raise ValueError("a reboot needs both a sysfs and a dev root")
        self.close()
        names = sorted(self.devices.values(), key=lambda n: (len(n), n))
        if order is None:
            order = sorted(self.devices, key=lambda v: (len(self.devices[v]), self.devices[v]))
            order.reverse()
        if sorted(order) != sorted(self.devices):
            raise ValueError("order must list every volume with a device, once")
        work = self._workdir()
        by_id = self.dev_root / "disk" / "by-id"
        try:
            aside: dict[str, Path] = {}
            for volume_id, name in self.devices.items():
                aside[volume_id] = work / f"reboot.{volume_id}"
                os.rename(self.sysfs_root / "block" / name, aside[volume_id])
                (self.dev_root / name).unlink(missing_ok=True)
                for link in self._links(volume_id):
                    (by_id / link).unlink(missing_ok=True)
            self.devices = dict(zip(order, names, strict=True))
            for volume_id, name in self.devices.items():
                # The scratch directory is as deep as block/: the device link still holds.
                os.rename(aside[volume_id], self.sysfs_root / "block" / name)
                (self.dev_root / name).touch()
                for link in self._links(volume_id):
                    os.symlink(f"../../{name}", by_id / link)
        finally:
            self._tidy()
        return dict(self.devices)

    def clear(self) -> None:
        """Remove every device made and forget pending changes."""
        self.close()
        for volume_id in list(self.devices):
            self._run(self._unplug_now, volume_id)
        self.plugged.clear()

    def close(self) -> None:
        """Cancel pending appearances and removals (the devices stay as they are)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- internals -------------------------------------------------------------------

    def _later(self, delay: float, volume_id: str, fn: Callable[..., None], *args: object) -> None:
        if delay <= 0:
            self._run(fn, *args)
            return
        loop = asyncio.get_running_loop()
        self._timers[volume_id] = loop.call_later(delay, self._fire, volume_id, fn, *args)

    def _fire(self, volume_id: str, fn: Callable[..., None], *args: object) -> None:
        self._timers.pop(volume_id, None)
        self._run(fn, *args)

    def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except OSError:
            log.exception("simulated device change failed")
        finally:
            self._tidy()

    def _tidy(self) -> None:
        """Drop the scratch directory when empty, so the roots hold only devices."""
        for root in (self.sysfs_root, self.dev_root):
            if root is not None:
                with contextlib.suppress(OSError):
                    (root / _WORKDIR).rmdir()

    def _settle(self, volume_id: str) -> None:
        """Finish a pending removal at once, so the volume's old device is gone first."""
        timer = self._timers.pop(volume_id, None)
        if timer is not None:
            timer.cancel()
            if volume_id in self.devices:
                self._run(self._unplug_now, volume_id)

    def _workdir(self) -> Path:
        root = self.sysfs_root or self.dev_root
        assert root is not None
        work = root / _WORKDIR
        work.mkdir(parents=True, exist_ok=True)
        return work

    def _taken(self, name: str) -> bool:
        if self.sysfs_root is not None:
            return (self.sysfs_root / "block" / name).exists()
        assert self.dev_root is not None
        return (self.dev_root / name).exists()

    def _links(self, volume_id: str) -> list[str]:
        parts = self._parts.get(volume_id)
        return parts.links if parts is not None else []

    def _free_index(self) -> int:
        """The lowest free name's index (on Xen from xvdb: a Xen guest's root disk is xvda)."""
        index = 1 if self.bus == "xen" else 0
        while self._taken(disk_name(index, self.bus)):
            index += 1
        return index

    def _lowest_free(self, path_of: Callable[[int], Path], first: int = 0) -> tuple[int, Path]:
        """The lowest index whose directory does not exist yet, made (as the kernel hands out
        the lowest free instance number)."""
        index = first
        while path_of(index).exists():
            index += 1
        path = path_of(index)
        path.mkdir(parents=True)
        return index, path

    def _new_device(self, index: int, serial: str | None) -> tuple[Path, Path]:
        """The disk's device directory under <sysfs>/devices, as its bus makes it: returns the
        directory its block device's ``device`` link names and the one to remove when the
        disk goes."""
        root = self.sysfs_root
        assert root is not None
        pci = root / "devices" / "pci0000:00"
        if self.bus == "virtio-scsi":
            target = root / _SCSI_HBA / "target0:0:0"
            _, unit = self._lowest_free(lambda lun: target / f"0:0:0:{lun}")
            (unit / "vendor").write_text(f"{SCSI_VENDOR:<8}\n")
            (unit / "model").write_text(f"{SCSI_MODEL:<16}\n")
            if serial is not None:
                # QEMU offers page 0x80 only with a serial; without one the kernel makes no file.
                (unit / "vpd_pg80").write_bytes(vpd_pg80(serial))
            return unit, unit
        if self.bus == "nvme":
            index, slot = self._lowest_free(lambda i: pci / f"0000:00:{_FIRST_NVME_SLOT + i:02x}.0")
            controller = slot / "nvme" / f"nvme{index}"
            controller.mkdir(parents=True)
            # The kernel prints the Identify Controller fields with their space padding.
            (controller / "serial").write_text(f"{serial or '':<20}\n")
            (controller / "model").write_text(f"{NVME_MODEL:<40}\n")
            return controller, slot
        if self.bus == "xen":
            # The vbd's number is the disk's (xvdb: 51728), as blkfront names disks by it.
            vbd = root / "devices" / f"vbd-{_XEN_VBD_BASE + 16 * index}"
            vbd.mkdir(parents=True)
            return vbd, vbd
        _, virtio = self._lowest_free(
            lambda i: pci / f"0000:00:{i:02x}.0" / f"virtio{i}", _FIRST_VIRTIO
        )
        return virtio, virtio.parent

    def _plug_now(self, volume_id: str, size: int) -> None:
        serial = serial_of(volume_id) if self.serials else None
        index = self._free_index()
        name = disk_name(index, self.bus)
        eui = None
        if self.bus == "nvme":
            # QEMU gives each namespace an EUI-64 under its OUI 52:54:00 (nvme-ns eui64-default).
            eui = f"525400{len(self.plugged) + 1:010x}"
        parts = _Plugged(links=by_id_names(self.bus, serial, eui), remove=None)
        if self.sysfs_root is not None:
            block = self.sysfs_root / "block"
            block.mkdir(parents=True, exist_ok=True)
            device, parts.remove = self._new_device(index, serial)
            tmp = self._workdir() / f"{name}.{uuid.uuid4().hex}"
            tmp.mkdir()
            (tmp / "size").write_text(f"{size // SECTOR}\n")
            if serial is not None and self.bus == "virtio-blk":
                (tmp / "serial").write_text(serial)
            if eui is not None:
                (tmp / "eui").write_text(" ".join(eui[i : i + 2] for i in range(0, 16, 2)) + "\n")
                (tmp / "wwid").write_text(f"eui.{eui}\n")
            # The scratch directory is as deep as block/, so the relative link holds there too.
            os.symlink(
                os.path.join("..", "..", device.relative_to(self.sysfs_root)), tmp / "device"
            )
            os.rename(tmp, block / name)
        self._parts[volume_id] = parts
        self.devices[volume_id] = name
        self.plugged.append((volume_id, name))
        if self.dev_root is not None:
            self.dev_root.mkdir(parents=True, exist_ok=True)
            (self.dev_root / name).touch()
            by_id = self.dev_root / "disk" / "by-id"
            for link in parts.links:
                by_id.mkdir(parents=True, exist_ok=True)
                tmp_link = by_id / f".{link}.{uuid.uuid4().hex}"
                os.symlink(f"../../{name}", tmp_link)
                os.replace(tmp_link, by_id / link)
        log.debug("hot-plugged %s (%s) for volume %s", name, self.bus, volume_id)

    def _unplug_now(self, volume_id: str) -> None:
        name = self.devices.pop(volume_id, None)
        if name is None:
            return
        parts = self._parts.pop(volume_id, _Plugged(links=[], remove=None))
        if self.sysfs_root is not None:
            path = self.sysfs_root / "block" / name
            if path.exists():
                gone = self._workdir() / f"gone.{name}.{uuid.uuid4().hex}"
                os.rename(path, gone)
                shutil.rmtree(gone, ignore_errors=True)
            if parts.remove is not None:
                shutil.rmtree(parts.remove, ignore_errors=True)
        if self.dev_root is not None:
            for link_name in parts.links:
                link = self.dev_root / "disk" / "by-id" / link_name
                if link.is_symlink() and os.readlink(link) == f"../../{name}":
                    link.unlink()
            (self.dev_root / name).unlink(missing_ok=True)
        log.debug("unplugged %s of volume %s", name, volume_id)
