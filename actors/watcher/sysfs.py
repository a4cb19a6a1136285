"""Reading block devices from sysfs and their stable links from ``$dev/disk/by-id``.

Pure reads, no bus: every function takes the roots it reads from, so tests point them at a
fake tree. A device is *present* when ``$sysfs/block/<name>`` exists with a non-zero size:
empty loop devices and drives without media sit there with size 0.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from msgspec.structs import replace

from schemas.devices import DeviceInfo

SECTOR = 512  # sysfs `size` is in 512-byte sectors whatever the device's block size

_VIRTIO = re.compile(r"^virtio\d+$")
# Errors that mean "the device went away while we read it" rather than "cannot read".
_GONE = {errno.ENOENT, errno.ENODEV, errno.ENXIO}


class Unreadable(OSError):
    """The device exists but could not be read now (not the same as absent)."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a kernel device name matches any of the glob patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def block_names(sysfs_root: str, patterns: Sequence[str]) -> list[str]:
    """Names under ``$sysfs/block`` that match ``patterns``; raises OSError when the
    directory cannot be listed (never to be mistaken for "no devices")."""
    return sorted(n for n in os.listdir(os.path.join(sysfs_root, "block")) if matches(n, patterns))


def read_device(sysfs_root: str, dev_root: str, name: str) -> DeviceInfo | None:
    """One device as sysfs shows it now, without ``by_id_path``; None when it is absent
    (no directory, or size 0). Raises Unreadable when it exists but a read failed."""
    base = os.path.join(sysfs_root, "block", name)
    try:
        sectors = int(_read(os.path.join(base, "size")))
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise Unreadable(e.errno, f"{name}: {e.strerror}") from e
    except ValueError as e:
        raise Unreadable(errno.EIO, f"{name}: size is not a number") from e
    if sectors <= 0:
        return None
    try:
        serial: str | None = _read(os.path.join(base, "serial")).strip() or None
    except OSError as e:
        if e.errno not in _GONE:
            raise Unreadable(e.errno, f"{name}: serial: {e.strerror}") from e
        if not os.path.isdir(base):
            return None  # vanished between the two reads
        serial = None
    return DeviceInfo(
        name=name,
        path=os.path.join(dev_root, name),
        size=sectors * SECTOR,
        serial=serial,
        controller=controller_of(base),
    )


def controller_of(block_dir: str) -> str | None:
    """The virtio device the disk hangs off (``virtio4``), else the last component of its
    ``device`` link (an nvme controller, a SCSI address), or None without that link."""
    link = os.path.join(block_dir, "device")
    if not os.path.islink(link):
        return None
    parts = os.path.realpath(link).split(os.sep)
    for part in reversed(parts):
        if _VIRTIO.match(part):
            return part
    return parts[-1] or None


def by_id_links(dev_root: str) -> dict[str, list[str]]:
    """Device name → links in ``$dev/disk/by-id`` that point at ``$dev/<name>`` (one listing
    and one readlink per link). Empty when the directory does not exist (no udev)."""
    directory = os.path.join(dev_root, "disk", "by-id")
    try:
        entries = os.listdir(directory)
    except OSError:
        return {}
    dev = os.path.normpath(dev_root)
    found: dict[str, list[str]] = {}
    for entry in entries:
        link = os.path.join(directory, entry)
        try:
            target = os.path.normpath(os.path.join(directory, os.readlink(link)))
        except OSError:
            continue  # not a link, or removed meanwhile
        head, name = os.path.split(target)
        if head == dev and name:
            found.setdefault(name, []).append(link)
    return found


def pick_by_id(links: Iterable[str], serial: str | None) -> str | None:
    """The most telling link: ``virtio-<serial>``, other virtio, scsi, nvme, ata, the rest."""

    def rank(link: str) -> tuple[int, str]:
        base = os.path.basename(link)
        if serial and base == f"virtio-{serial}":
            return (0, base)
        for i, prefix in enumerate(("virtio-", "scsi-", "nvme-", "ata-"), start=1):
            if base.startswith(prefix):
                return (i, base)
        return (9, base)

    ordered = sorted(links, key=rank)
    return ordered[0] if ordered else None


def find_by_id(dev_root: str, name: str, serial: str | None) -> str | None:
    """The by-id link of one device, or None."""
    return pick_by_id(by_id_links(dev_root).get(name, ()), serial)


def scan_detailed(
    sysfs_root: str,
    dev_root: str,
    patterns: Sequence[str],
    *,
    resolve_by_id: bool = True,
) -> tuple[dict[str, DeviceInfo], set[str]]:
    """Present devices, and the names that exist but could not be read this time (neither
    present nor absent: a caller keeps what it knew of them)."""
    devices: dict[str, DeviceInfo] = {}
    unreadable: set[str] = set()
    for name in block_names(sysfs_root, patterns):
        try:
            info = read_device(sysfs_root, dev_root, name)
        except Unreadable:
            unreadable.add(name)
            continue
        if info is not None:
            devices[name] = info
    if resolve_by_id and devices:
        devices = with_by_id(devices, by_id_links(dev_root))
    return devices, unreadable


def with_by_id(
    devices: Mapping[str, DeviceInfo], links: Mapping[str, Sequence[str]]
) -> dict[str, DeviceInfo]:
    return {
        name: replace(info, by_id_path=pick_by_id(links.get(name, ()), info.serial))
        for name, info in devices.items()
    }


def scan(sysfs_root: str, dev_root: str, patterns: Sequence[str]) -> dict[str, DeviceInfo]:
    """Every present block device whose name matches ``patterns``, by name.

    A device that vanishes or cannot be read mid-scan is left out (the next scan sees it).
    Raises OSError when ``$sysfs/block`` itself cannot be listed.
    """
    return scan_detailed(sysfs_root, dev_root, patterns)[0]


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", "replace")
