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

from schemas.devices import Bus, DeviceInfo, SerialSource

SECTOR = 512  # sysfs `size` is in 512-byte sectors whatever the device's block size

_VIRTIO = re.compile(r"^virtio\d+$")
_SCSI_ADDRESS = re.compile(r"^\d+:\d+:\d+:\d+$")
_BUSES: tuple[tuple[re.Pattern[str], Bus], ...] = (
    (re.compile(r"^vd[a-z]+$"), "virtio-blk"),
    (re.compile(r"^sd[a-z]+$"), "scsi"),
    (re.compile(r"^nvme\d+n\d+$"), "nvme"),
    (re.compile(r"^xvd[a-z]+$"), "xen"),
)
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


def bus_of(name: str) -> Bus | None:
    """The bus a kernel disk name says: vd* virtio-blk, sd* SCSI (virtio-scsi too), nvme*n*
    an NVMe namespace, xvd* Xen; None for any other name."""
    for pattern, bus in _BUSES:
        if pattern.match(name):
            return bus
    return None


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
    bus = bus_of(name)
    serial, source = _serial(base, name, bus)
    if serial is None and not os.path.isdir(base):
        return None  # vanished between the reads
    return DeviceInfo(
        name=name,
        path=os.path.join(dev_root, name),
        size=sectors * SECTOR,
        serial=serial,
        controller=controller_of(base),
        bus=bus,
        serial_source=source if serial is not None else None,
        namespace_id=_namespace_id(base, name) if bus == "nvme" else None,
    )


def _serial(base: str, name: str, bus: Bus | None) -> tuple[str | None, SerialSource | None]:
    """The serial where the disk's bus keeps it (contract §6), and where that is. A file
    that is not there means no serial; one that is there but cannot be read raises
    Unreadable (the device is neither present nor absent this time)."""
    if bus == "xen":
        return None, None  # Xen's blkfront exposes no serial
    if bus == "scsi":
        page = _optional(base, name, os.path.join("device", "vpd_pg80"))
        return (vpd_pg80_serial(page) if page is not None else None), "vpd_pg80"
    if bus == "nvme":
        # A namespace's `device` is its controller (with native multipath its subsystem,
        # which has the same `serial`): all namespaces of one controller share it.
        text = _optional(base, name, os.path.join("device", "serial"))
        return _text(text), "nvme_controller"
    return _text(_optional(base, name, "serial")), "virtio"


def vpd_pg80_serial(page: bytes) -> str | None:
    """The unit serial number of a SCSI VPD page 0x80 as the kernel exposes it
    (``device/vpd_pg80``): a 4-byte header (peripheral type, page code 0x80, then the page
    length, big-endian in bytes 2-3; SPC-2 has byte 2 reserved, zero) and that many bytes of
    ASCII serial, which devices pad with spaces (or NULs) on either side. None for a page
    that is not 0x80, is shorter than its header says, or holds only padding: no serial
    rather than a wrong one."""
    if len(page) < 4 or page[1] != 0x80:
        return None
    length = int.from_bytes(page[2:4], "big")
    if len(page) < 4 + length:
        return None  # truncated: part of a serial is not the serial
    return _text(page[4 : 4 + length])


def _namespace_id(base: str, name: str) -> str | None:
    """An NVMe namespace's own identifier: the kernel's `wwid` (made from the best of the
    namespace's ids: ``uuid.``, ``eui.``, else ``nvme.`` vendor-serial-model-nsid), else, on
    kernels without it, `nguid` or `eui` (present only where the namespace reports one)."""
    for attr in ("wwid", "nguid", "eui"):
        if (value := _text(_optional(base, name, attr))) is not None:
            return value
    return None


def _optional(base: str, name: str, rel: str) -> bytes | None:
    """An attribute's bytes, or None where the device has no such file."""
    try:
        return _read_bytes(os.path.join(base, rel))
    except OSError as e:
        if e.errno in _GONE or e.errno == errno.ENOTDIR:
            return None
        raise Unreadable(e.errno, f"{name}: {rel}: {e.strerror}") from e


def _text(raw: bytes | None) -> str | None:
    """Printable text without the padding firmware adds (spaces, NULs, newlines); None
    when nothing is left."""
    if raw is None:
        return None
    return raw.decode("ascii", "replace").strip(" \t\r\n\0") or None


def controller_of(block_dir: str) -> str | None:
    """What the disk hangs off, unique per disk: a SCSI disk's address (``0:0:0:1``; all
    disks of a virtio-scsi HBA share its virtio device), else the virtio device
    (``virtio4``), else the last component of its ``device`` link (an NVMe controller, a
    Xen ``vbd-51728``), or None without that link."""
    link = os.path.join(block_dir, "device")
    if not os.path.islink(link):
        return None
    parts = os.path.realpath(link).split(os.sep)
    if _SCSI_ADDRESS.match(parts[-1]):
        return parts[-1]
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
        if entry.startswith("."):
            # A link being made (udev, like the simulator, writes ".<name>.<random>" and then
            # renames it): not a name anyone can rely on, and gone in a moment.
            continue
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
    """The most telling link: the one udev made from the serial (``virtio-<serial>``,
    ``scsi-0QEMU_QEMU_HARDDISK_<serial>``, ``nvme-<model>_<serial>``), then other virtio,
    scsi, nvme, ata links, then the rest (``wwn-``, ``nvme-eui.``...)."""

    def rank(link: str) -> tuple[int, str]:
        base = os.path.basename(link)
        if serial and (base == f"virtio-{serial}" or base.endswith(f"_{serial}")):
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
    return _read_bytes(path).decode("utf-8", "replace")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)
