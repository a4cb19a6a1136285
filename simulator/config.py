"""What the simulated CloudStack looks like: its seeded world, its timing and its fake devices."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

NonNegative = Annotated[float, Meta(ge=0)]
DiskBus = Literal["virtio-blk", "virtio-scsi", "nvme", "xen"]
"""The buses a guest's hot-plugged disks can be on (simulator/hotplug.py lays each out)."""


class DiskOfferingConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One disk offering of the zone."""

    id: str | None = None
    """CloudStack id; None: a uuid derived from the seed."""
    name: str = "Custom"
    disk_size_gb: Annotated[int, Meta(ge=0)] = 0
    """Fixed size in GB; 0 makes a customized offering (createVolume must pass size)."""


class VMConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One virtual machine that volumes can be attached to."""

    id: str | None = None
    """CloudStack id; None: a uuid derived from the seed."""
    name: str | None = None
    """None: sim-vm-<n>."""
    state: Literal["Running", "Stopped"] = "Running"
    root_disk: bool = True
    """Give the VM a ROOT volume at deviceid 0 (as every real VM has)."""


class GuestConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A VM whose volumes appear as devices in a fake sysfs and /dev tree of its own (a host
    volumed runs on). An attach to it hot-plugs into its tree only."""

    vm_id: str | None = None
    """The VM's CloudStack id; None: the first configured VM that no earlier guest is."""
    sysfs_root: str | None = None
    """Its fake sysfs root (devices as <sysfs_root>/block/vdX); None: no sysfs entries."""
    dev_root: str | None = None
    """Its fake /dev (nodes <dev_root>/vdX, links <dev_root>/disk/by-id/); None: no nodes."""


def _default_offerings() -> tuple[DiskOfferingConfig, ...]:
    return (
        DiskOfferingConfig(name="Custom", disk_size_gb=0),
        DiskOfferingConfig(name="Small", disk_size_gb=5),
    )


def _default_vms() -> tuple[VMConfig, ...]:
    return (VMConfig(), VMConfig(), VMConfig())


class SimConfig(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything the simulator is told; the same keys are read from a TOML file."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 0
    """0: an ephemeral port."""
    seed: int = 0
    """Seeds every id and key not given explicitly, so the same config gives the same world."""
    api_key: str | None = None
    """The account's api key; None: derived from the seed."""
    secret_key: str | None = None
    """The account's secret key; None: derived from the seed. Never logged."""
    account: str = "admin"
    zone_id: str | None = None
    zone_name: str = "sim-zone-1"
    disk_offerings: tuple[DiskOfferingConfig, ...] = msgspec.field(
        default_factory=_default_offerings
    )
    vms: tuple[VMConfig, ...] = msgspec.field(default_factory=_default_vms)
    local_vm_id: str | None = None
    """The VM the daemon runs on, the first guest when sysfs_root or dev_root is set; None:
    the first guest's VM, else the first VM."""
    max_data_disks: Annotated[int, Meta(ge=1, le=64)] = 6
    """Data disks one VM may have attached (CloudStack's hypervisor capability)."""
    job_latency: NonNegative = 0.0
    """Seconds an async job stays pending before its change is applied."""
    command_latency: dict[str, NonNegative] = msgspec.field(default_factory=dict)
    """Per-command override of job_latency, e.g. {"attachVolume": 0.5}."""
    call_log_size: Annotated[int, Meta(ge=1)] = 100_000
    """Calls kept in the call log (oldest dropped first); also the finished jobs kept."""
    sysfs_root: str | None = None
    """Fake sysfs root: attaches to the local VM appear as <sysfs_root>/block/vdX; None: off.
    With dev_root, the first guest (the local VM's); ``guests`` adds more."""
    dev_root: str | None = None
    """Fake /dev: device nodes <dev_root>/vdX and links <dev_root>/disk/by-id/; None: off."""
    guests: tuple[GuestConfig, ...] = ()
    """More guests, each VM with its own tree (several hosts), after the local VM's."""
    serials: bool = True
    """Give hot-plugged devices the volume's serial (KVM) or none (other hypervisors)."""
    bus: DiskBus = "virtio-blk"
    """The bus local attaches are hot-plugged on, laid out in sysfs and /dev as the kernel
    and udev show it (simulator/hotplug.py): vdX with ``serial``; sdX with the serial in
    ``device/vpd_pg80``; nvme<C>n1 with the controller's ``device/serial``; xvdX without."""
    hotplug_delay: NonNegative = 0.0
    """Seconds between an attach job completing and its device appearing."""
    unplug_delay: NonNegative = 0.0
    """Seconds between a detach job completing and its device going."""
    cloudstack_version: str = "4.19.1.0"
    """Reported by listCapabilities."""


def guest_configs(config: SimConfig) -> list[GuestConfig]:
    """Every guest, the local VM's (from sysfs_root and dev_root, when either is set) first;
    VM ids not yet resolved."""
    first = []
    if config.sysfs_root is not None or config.dev_root is not None:
        first.append(
            GuestConfig(
                vm_id=config.local_vm_id, sysfs_root=config.sysfs_root, dev_root=config.dev_root
            )
        )
    return [*first, *config.guests]


def load_config(path: str | Path, **overrides: Any) -> SimConfig:
    """Read a TOML file (keys as in SimConfig, unknown keys rejected), then apply overrides."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(data, SimConfig)
