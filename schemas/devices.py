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
    appeared_at: float = 0.0  # time.time() when the device was first seen
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

    ``inventory`` lists every device present when the watcher starts (or after a rescan
    that found the state had drifted); those are not "added". ``at`` is time.time() of the
    observation; ``source`` says whether a uevent or a rescan saw it.
    """

    kind: DeviceEventKind
    vm_id: str
    at: float
    source: Literal["uevent", "rescan", "start"]
    device: DeviceInfo | None = None
    devices: tuple[DeviceInfo, ...] = ()
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
    reboot renames disks). ``at`` is time.time() of the correlator's device state: an older
    proof never overwrites a newer one."""

    vm_id: str
    at: float
    correlator: str = ""
    mappings: tuple[ProvenMapping, ...] = ()
