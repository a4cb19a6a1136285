"""Block devices as the watcher reports them (contract §6)."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

# "changed": a present device's size changed (same name, serial and controller): the same
# disk, resized, never a new one.
DeviceEventKind = Literal["added", "removed", "changed", "inventory"]

# Where a disk's bus keeps its serial (contract §6), as the watcher read it: virtio-blk's
# `serial` file, the unit serial of a SCSI disk's VPD page 0x80 (`device/vpd_pg80`, virtio-scsi
# included), an NVMe namespace's controller (`device/serial`). Xen disks have none.
SerialSource = Literal["virtio", "vpd_pg80", "nvme_controller"]
Bus = Literal["virtio-blk", "scsi", "nvme", "xen"]

_SERIAL_SOURCES: dict[str, str] = {
    "virtio": "virtio serial",
    "vpd_pg80": "serial from VPD page 0x80",
    "nvme_controller": "NVMe controller serial",
}


class DeviceInfo(Struct, kw_only=True, frozen=True):
    name: str  # kernel name, e.g. "vdb"
    path: str  # $VOLUMED_DEV/<name>
    size: int  # bytes (sysfs `size` is in 512-byte sectors)
    serial: str | None = None  # where the bus keeps it (serial_source), when it has one
    by_id_path: str | None = None  # $VOLUMED_DEV/disk/by-id/<link> that points at this device
    controller: str | None = None  # e.g. "virtio4", from the `device` link
    # When the disk appeared, as an interval on the watcher's host clock (time.time()):
    # ``appeared_at`` is the latest it can have appeared (the arrival of the kernel uevent
    # that announced it; for a disk a rescan found unannounced, the end of that rescan; for
    # a disk present at the watcher's start, the start scan), ``appeared_after`` the
    # earliest: equal to ``appeared_at`` for a uevent, the start of the previous scan for a
    # rescan, 0.0 for "before the watcher started" (unknown). None (watchers older than the
    # field): the same as ``appeared_at``. Never the time of whichever read happened to see
    # it. The pair is fixed for one appearance: the same disk keeps it in every later event
    # and snapshot of the same watcher, so it also tells an appearance from another.
    appeared_at: float = 0.0
    appeared_after: float | None = None
    bus: Bus | None = None  # from the kernel name: vd* virtio-blk, sd* scsi, nvme*n* nvme, xvd*
    serial_source: SerialSource | None = None  # where ``serial`` was read (None: no serial)
    # An NVMe namespace's own id (sysfs `wwid`, else `nguid` or `eui`): several
    # namespaces of one controller share its serial, never this.
    namespace_id: str | None = None


def identity_of(info: DeviceInfo) -> str:
    """In words, which identity of the device its serial is: "serial from VPD page 0x80"."""
    if info.serial is None:
        return "no serial"
    return _SERIAL_SOURCES.get(info.serial_source or "", "serial")


class DeviceEvent(Struct, kw_only=True, frozen=True):
    """A change of the host's block devices.

    ``inventory`` lists every device present when the watcher starts; those are not
    "added". ``at`` is time.time() of the observation (the uevent's arrival, or the read or
    scan that saw the change); when a device appeared is in its ``DeviceInfo``. ``source``
    says whether a uevent or a rescan saw it; an ``added`` with ``source="start"`` is a disk
    present at the start scan that could only be read later (it appeared before the watcher
    started, never "now").
    """

    kind: DeviceEventKind
    vm_id: str
    at: float
    source: Literal["uevent", "rescan", "start"]
    device: DeviceInfo | None = None
    devices: tuple[DeviceInfo, ...] = ()
    # inventory: names that exist but could not be read (neither present nor absent: a
    # reader keeps what it knew of them; each is announced once readable, ``added`` with
    # source "start", or ``removed``, with size 0, if it goes first).
    unread: tuple[str, ...] = ()
    watcher: str = ""  # instance id of the reporting watcher


class DeviceSnapshot(Struct, kw_only=True, frozen=True):
    """A VM's block devices as its watcher last saw them (the devices KV bucket, key: vm id).

    Written after each published change, so a correlator that starts late or restarts knows
    what is present without replaying the device stream. ``seq`` counts the watcher's
    published events; ``at`` is time.time() of the last change.
    """

    vm_id: str
    watcher: str
    at: float
    devices: tuple[DeviceInfo, ...] = ()
    seq: int = 0
    unread: tuple[str, ...] = ()  # as in an inventory: there, but not readable yet


# How a mapping names its device now: "serial" (the device carries the volume's serial),
# "exclusive" (a device without serial that this correlator proved by exclusion and whose
# appearance has not changed since), or "none" (no device can be proven: device_path null).
ProofKind = Literal["serial", "exclusive", "none"]


class MappedVolume(Struct, kw_only=True, frozen=True):
    """A device mapping of this VM as the database holds it (what is to be proven)."""

    volume_id: str
    operation_id: str | None = None  # the attach that made the mapping
    device_path: str | None = None


class ProvenMapping(Struct, kw_only=True, frozen=True):
    """One mapped volume of a VM, proven again against the devices present now."""

    volume_id: str
    operation_id: str | None  # applies only to the mapping made by this attach
    proof: ProofKind
    device_path: str | None = None  # None when proof is "none"
    by_id_path: str | None = None
    # Why nothing could be proven (proof "none"), else how it was: with proof "serial" which
    # identity of the device carried it ("serial from VPD page 0x80 of /dev/sdb").
    reason: str = ""
    # The identity that proved it: "virtio serial", "serial from VPD page 0x80", "NVMe
    # controller serial", or "exclusion" (no serial); "" with proof "none".
    identity: str = ""


class MappingProof(Struct, kw_only=True, frozen=True):
    """Correlator → persistence: every mapped volume of one VM proven again (at start, when
    a device appears or goes, and periodically), so that a mapping names the disk as it is
    now or names nothing, never a name the kernel may have given another disk since (a
    reboot renames disks). ``at`` is time.time() of the correlator's device state, shown
    only (``proven_at``): persistence orders proofs by their sequence in the mapping proofs
    stream, never by a clock, so an older proof never overwrites a newer one."""

    vm_id: str
    at: float
    correlator: str = ""
    mappings: tuple[ProvenMapping, ...] = ()
