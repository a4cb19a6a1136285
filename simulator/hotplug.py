"""Fake block devices: what a guest kernel and udev show when a volume is hot-plugged.

An attach to the local VM makes ``<sysfs>/block/vdX/{size,serial}`` with ``device`` a relative
link to its own virtio device ``<sysfs>/devices/pci0000:00/0000:00:NN.0/virtioN``, the node
``<dev>/vdX`` and, with serials, the link ``<dev>/disk/by-id/virtio-<serial>``. The name is the
lowest free one, unrelated to CloudStack's deviceid, as in a real guest. Each sysfs directory
is built aside and renamed into place, so a scanner never sees a device without its ``size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SECTOR = 512
SERIAL_LENGTH = 20
_WORKDIR = ".simulator"
_FIRST_VIRTIO = 4
"""virtio0..3 are the guest's NIC, console, balloon and root disk."""


def disk_name(index: int) -> str:
    """The kernel's name of the index-th virtio disk: vda..vdz, vdaa..vdzz, vdaaa..."""
    letters = ""
    while index >= 0:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26 - 1
    return f"vd{letters}"


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
    ) -> None:
        self.sysfs_root = Path(sysfs_root) if sysfs_root is not None else None
        self.dev_root = Path(dev_root) if dev_root is not None else None
        self.serials = serials
        self.hotplug_delay = hotplug_delay
        self.unplug_delay = unplug_delay
        self.devices: dict[str, str] = {}
        """volume id -> device name, for the devices present now."""
        self.plugged: list[tuple[str, str]] = []
        """(volume id, device name) of every device made, oldest first: which device a
        volume had, after it has gone (a name is used again once free)."""
        self._controllers: dict[str, Path] = {}
        """volume id -> its virtio device directory under <sysfs>/devices."""
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def enabled(self) -> bool:
        return self.sysfs_root is not None or self.dev_root is not None

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
                if self.serials:
                    (by_id / f"virtio-{serial_of(volume_id)}").unlink(missing_ok=True)
            self.devices = dict(zip(order, names, strict=True))
            for volume_id, name in self.devices.items():
                # The scratch directory is as deep as block/: the device link still holds.
                os.rename(aside[volume_id], self.sysfs_root / "block" / name)
                (self.dev_root / name).touch()
                if self.serials:
                    os.symlink(f"../../{name}", by_id / f"virtio-{serial_of(volume_id)}")
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

    def _free_name(self) -> str:
        index = 0
        while self._taken(disk_name(index)):
            index += 1
        return disk_name(index)

    def _new_controller(self) -> Path:
        """A fresh virtio device directory (the lowest free index, as the guest kernel's)."""
        assert self.sysfs_root is not None
        index = _FIRST_VIRTIO
        while True:
            path = (
                self.sysfs_root / "devices" / "pci0000:00" / f"0000:00:{index:02x}.0/virtio{index}"
            )
            if not path.exists():
                path.mkdir(parents=True)
                return path
            index += 1

    def _plug_now(self, volume_id: str, size: int) -> None:
        serial = serial_of(volume_id) if self.serials else None
        name = self._free_name()
        if self.sysfs_root is not None:
            block = self.sysfs_root / "block"
            block.mkdir(parents=True, exist_ok=True)
            controller = self._new_controller()
            self._controllers[volume_id] = controller
            tmp = self._workdir() / f"{name}.{uuid.uuid4().hex}"
            tmp.mkdir()
            (tmp / "size").write_text(f"{size // SECTOR}\n")
            if serial is not None:
                (tmp / "serial").write_text(serial)
            # The scratch directory is as deep as block/, so the relative link holds there too.
            os.symlink(
                os.path.join("..", "..", controller.relative_to(self.sysfs_root)), tmp / "device"
            )
            os.rename(tmp, block / name)
        self.devices[volume_id] = name
        self.plugged.append((volume_id, name))
        if self.dev_root is not None:
            self.dev_root.mkdir(parents=True, exist_ok=True)
            (self.dev_root / name).touch()
            if serial is not None:
                by_id = self.dev_root / "disk" / "by-id"
                by_id.mkdir(parents=True, exist_ok=True)
                tmp_link = by_id / f".virtio-{serial}.{uuid.uuid4().hex}"
                os.symlink(f"../../{name}", tmp_link)
                os.replace(tmp_link, by_id / f"virtio-{serial}")
        log.debug("hot-plugged %s for volume %s", name, volume_id)

    def _unplug_now(self, volume_id: str) -> None:
        name = self.devices.pop(volume_id, None)
        if name is None:
            return
        if self.sysfs_root is not None:
            path = self.sysfs_root / "block" / name
            if path.exists():
                gone = self._workdir() / f"gone.{name}.{uuid.uuid4().hex}"
                os.rename(path, gone)
                shutil.rmtree(gone, ignore_errors=True)
            controller = self._controllers.pop(volume_id, None)
            if controller is not None:
                shutil.rmtree(controller.parent, ignore_errors=True)
        if self.dev_root is not None:
            if self.serials:
                link = self.dev_root / "disk" / "by-id" / f"virtio-{serial_of(volume_id)}"
                if link.is_symlink() and os.readlink(link) == f"../../{name}":
                    link.unlink()
            (self.dev_root / name).unlink(missing_ok=True)
        log.debug("unplugged %s of volume %s", name, volume_id)
