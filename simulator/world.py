"""The simulated cloud: one account, one zone, disk offerings, VMs, volumes and async jobs.

Commands are checked in two places, as in CloudStack: parameters (required ones, ids that must
name something) when the request arrives, answered with an HTTP error; the volume rules
(attached or not, free device ids, disk limits) when the job runs, answered as a failed job.
A job's change is applied only when it completes, so a pending attach has not attached yet.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from simulator.config import SimConfig, guest_configs

log = logging.getLogger(__name__)

GIB = 1024**3
ROOT_DISK_SIZE = 8 * GIB
CUSTOM_DISK_MAX_GB = 1024
DEFAULT_PAGE_SIZE = 500
CD_ROM_DEVICE_ID = 3

# ApiErrorCode and CSExceptionErrorCode values.
PARAM_ERROR = 431
INTERNAL_ERROR = 530
CS_INVALID_PARAMETER = 4350
CS_GENERIC = 9999

PENDING, SUCCEEDED, FAILED = 0, 1, 2

_CMD_PACKAGE = "org.apache.cloudstack.api.command.user"

Params = Mapping[str, str]
Body = dict[str, Any]

ATTACHED_MESSAGE = "Please specify a volume that is not attached to any VM."
NOT_ATTACHED_MESSAGE = "The specified volume is not attached to a VM."


class ApiError(Exception):
    """A CloudStack error: errorcode is the HTTP status (or the failed job's errorcode)."""

    def __init__(self, errorcode: int, errortext: str, cserrorcode: int = CS_INVALID_PARAMETER):
        super().__init__(errortext)
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode


def invalid_id(param: str, value: str) -> ApiError:
    """What CloudStack says of an id that names nothing (ParamProcessWorker)."""
    return ApiError(
        PARAM_ERROR,
        f"Invalid parameter {param} value={value} due to incorrect long value format, or entity "
        "does not exist or due to incorrect parameter annotation for the field in api cmd class.",
    )


def timestamp(at: float | None = None) -> str:
    """CloudStack's date format, e.g. 2026-01-01T12:00:00+0000."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(at))


@dataclass(slots=True)
class Zone:
    id: str
    name: str


@dataclass(slots=True)
class DiskOffering:
    id: str
    name: str
    disk_size_gb: int
    created: str

    @property
    def customized(self) -> bool:
        return self.disk_size_gb == 0


@dataclass(slots=True)
class VirtualMachine:
    id: str
    name: str
    state: str
    created: str
    devices: dict[int, str] = field(default_factory=dict)
    """deviceid -> id of the volume attached there."""


@dataclass(slots=True)
class Volume:
    id: str
    name: str
    size: int
    """Bytes."""
    type: str
    """ROOT or DATADISK."""
    state: str
    """Allocated until first attached, then Ready."""
    zone_id: str
    disk_offering_id: str | None
    created: str
    vm_id: str | None = None
    device_id: int | None = None
    attached: str | None = None
    job_id: str | None = None
    """The pending job working on this volume, if any."""


@dataclass(slots=True)
class Job:
    id: str
    command: str
    instance_id: str | None
    created: str
    status: int = PENDING
    result_code: int = 0
    result: Body | None = None
    completed: str | None = None


class WorldHooks(Protocol):
    """Told about volume changes as jobs complete (the hot-plug of local devices)."""

    def attached(self, volume: Volume, vm: VirtualMachine) -> None: ...

    def detached(self, volume: Volume, vm: VirtualMachine) -> None: ...

    def resized(self, volume: Volume, vm: VirtualMachine) -> None: ...


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    is_async: bool
    required: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("createVolume", True, ("name", "diskofferingid", "zoneid")),
        Command("attachVolume", True, ("id", "virtualmachineid")),
        Command("detachVolume", True),
        Command("resizeVolume", True, ("id",)),
        Command("deleteVolume", False, ("id",)),
        Command("listVolumes", False),
        Command("queryAsyncJobResult", False, ("jobid",)),
        Command("listVirtualMachines", False),
        Command("listZones", False),
        Command("listDiskOfferings", False),
        Command("listCapabilities", False),
    )
}


def response_key(command: str | None) -> str:
    """The single top-level key of an answer: the command's name lowercased + "response"."""
    if command in COMMANDS:
        return f"{command.lower()}response"
    return "errorresponse"


class World:
    """The cloud's state and CloudStack's rules; used from one event loop, no locking."""

    def __init__(self, config: SimConfig, hooks: WorldHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks
        self._latency: dict[str | None, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._handlers: dict[str, Callable[[Params, str | None], Body]] = {
            "createVolume": self._create_volume,
            "attachVolume": self._attach_volume,
            "detachVolume": self._detach_volume,
            "resizeVolume": self._resize_volume,
            "deleteVolume": self._delete_volume,
            "listVolumes": self._list_volumes,
            "queryAsyncJobResult": self._query_async_job_result,
            "listVirtualMachines": self._list_virtual_machines,
            "listZones": self._list_zones,
            "listDiskOfferings": self._list_disk_offerings,
            "listCapabilities": self._list_capabilities,
        }
        self.reset()

    # -- the seeded world --------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seeded world: no volumes but the VMs' root disks, no jobs, no latency
        overrides beyond the config's."""
        self.cancel_timers()
        cfg = self.config
        rng = random.Random(cfg.seed)

        def uid() -> str:
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))

        def key() -> str:
            return base64.urlsafe_b64encode(rng.randbytes(64)).rstrip(b"=").decode()

        now = timestamp()
        # Always draw every value, used or not, so that giving one id leaves the others alone.
        self.domain_id, self.account_id, self.user_id = uid(), uid(), uid()
        generated_key, generated_secret = key(), key()
        self.api_key = cfg.api_key or generated_key
        self.secret_key = cfg.secret_key or generated_secret
        zone_id = uid()
        self.zone = Zone(id=cfg.zone_id or zone_id, name=cfg.zone_name)
        self.offerings: dict[str, DiskOffering] = {}
        for oc in cfg.disk_offerings:
            oid = uid()
            offering = DiskOffering(oc.id or oid, oc.name, oc.disk_size_gb, now)
            self.offerings[offering.id] = offering
        self.vms: dict[str, VirtualMachine] = {}
        self.volumes: dict[str, Volume] = {}
        for n, vc in enumerate(cfg.vms, start=1):
            vm_id, root_id = uid(), uid()
            vm = VirtualMachine(vc.id or vm_id, vc.name or f"sim-vm-{n}", vc.state, now)
            self.vms[vm.id] = vm
            if vc.root_disk:
                root = Volume(
                    id=root_id,
                    name=f"ROOT-{n}",
                    size=ROOT_DISK_SIZE,
                    type="ROOT",
                    state="Ready",
                    zone_id=self.zone.id,
                    disk_offering_id=None,
                    created=now,
                    vm_id=vm.id,
                    device_id=0,
                    attached=now,
                )
                self.volumes[root.id] = root
                vm.devices[0] = root.id
        if cfg.local_vm_id is not None and cfg.local_vm_id not in self.vms:
            raise ValueError(f"local_vm_id {cfg.local_vm_id} is not one of the configured VMs")
        self.guest_vm_ids = self._guest_vm_ids()
        """The VM of each guest (guest_configs order): the VMs with a device tree."""
        self.local_vm_id: str | None = (
            cfg.local_vm_id or next(iter(self.guest_vm_ids), None) or next(iter(self.vms), None)
        )
        self.removed: OrderedDict[str, None] = OrderedDict()
        """Ids of deleted volumes (the newest call_log_size): CloudStack keeps their rows, so
        listVolumes finds nothing for them instead of refusing the id."""
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.mutations: Counter[str] = Counter()
        self._latency = {None: cfg.job_latency}
        self._latency.update(cfg.command_latency)

    def _guest_vm_ids(self) -> list[str]:
        taken: list[str] = []
        for guest in guest_configs(self.config):
            if guest.vm_id is None:
                vm_id = next((v for v in self.vms if v not in taken), None)
                if vm_id is None:
                    raise ValueError("more guests than VMs")
            elif guest.vm_id not in self.vms:
                raise ValueError(f"guest VM {guest.vm_id} is not one of the configured VMs")
            elif guest.vm_id in taken:
                raise ValueError(f"VM {guest.vm_id} is two guests")
            else:
                vm_id = guest.vm_id
            taken.append(vm_id)
        return taken

    @property
    def secrets(self) -> dict[str, str]:
        """api key -> secret key of every account (there is one)."""
        return {self.api_key: self.secret_key}

    def set_latency(self, seconds: float, command: str | None = None) -> None:
        """Job latency of one command, or the default of all (command None)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency[command] = seconds

    def latency(self, command: str) -> float:
        return self._latency.get(command, self._latency[None])

    def pending_jobs(self) -> int:
        return len(self._timers)

    def last_deadline(self) -> float | None:
        """Loop time at which the last pending job completes; None when none is pending."""
        return max((t.when() for t in self._timers.values()), default=None)

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    # -- dispatch ------------------------------------------------------------------------

    def execute(self, command: str, params: Params, fail_job: str | None = None) -> Body:
        """Run one API command; its answer body, or ApiError.

        ``fail_job``: the errortext with which the command's job is to fail (an injected fault).
        """
        spec = COMMANDS[command]
        for name in spec.required:
            if not params.get(name):
                raise ApiError(
                    PARAM_ERROR,
                    f"Unable to execute API command {command.lower()} due to missing parameter "
                    f"{name}",
                    CS_GENERIC,
                )
        return self._handlers[command](params, fail_job)

    def _submit(
        self,
        command: str,
        instance_id: str | None,
        run: Callable[[], Body],
        fail_job: str | None,
        on_fail: Callable[[], None] | None = None,
    ) -> Job:
        job = Job(str(uuid.uuid4()), command, instance_id, timestamp())
        self.jobs[job.id] = job
        while len(self.jobs) > self.config.call_log_size:
            self.jobs.popitem(last=False)
        volume = self.volumes.get(instance_id or "")
        if volume is not None:
            volume.job_id = job.id
        delay = self.latency(command)
        if delay <= 0:
            self._finish(job, run, fail_job, on_fail)
        else:
            loop = asyncio.get_running_loop()
            self._timers[job.id] = loop.call_later(delay, self._finish, job, run, fail_job, on_fail)
        return job

    def _finish(
        self,
        job: Job,
        run: Callable[[], Body],
        fail_job: str | None,
        on_fail: Callable[[], None] | None,
    ) -> None:
        self._timers.pop(job.id, None)
        try:
            if fail_job is not None:
                raise ApiError(INTERNAL_ERROR, fail_job, CS_GENERIC)
            result = run()
        except ApiError as e:
            if on_fail is not None:
                on_fail()
            job.status, job.result_code = FAILED, INTERNAL_ERROR
            job.result = {
                "errorcode": e.errorcode,
                "cserrorcode": e.cserrorcode,
                "errortext": e.errortext,
            }
        else:
            job.status, job.result_code, job.result = SUCCEEDED, 0, result
        job.completed = timestamp()
        volume = self.volumes.get(job.instance_id or "")
        if volume is not None and volume.job_id == job.id:
            volume.job_id = None

    # -- parameters ----------------------------------------------------------------------

    @staticmethod
    def _long(command: str, params: Params, name: str) -> int | None:
        value = params.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ApiError(
                PARAM_ERROR,
                f"Unable to execute API command {command.lower()} due to invalid value {value} "
                f"for parameter {name}",
                CS_GENERIC,
            ) from None

    @staticmethod
    def _bool(params: Params, name: str) -> bool:
        return params.get(name, "").lower() == "true"

    def _volume(self, params: Params, name: str = "id") -> Volume:
        value = params[name]
        volume = self.volumes.get(value)
        if volume is None:
            raise invalid_id(name, value)
        return volume

    def _vm(self, params: Params, name: str = "virtualmachineid") -> VirtualMachine:
        value = params[name]
        vm = self.vms.get(value)
        if vm is None:
            raise invalid_id(name, value)
        return vm

    def _check_zone(self, params: Params, name: str = "zoneid") -> None:
        value = params.get(name)
        if value and value != self.zone.id:
            raise invalid_id(name, value)

    def _page(self, command: str, params: Params, items: list[Body], key: str) -> Body:
        """A list answer: {"count": N, key: [...]} for one page, {} when nothing matched."""
        total = len(items)
        if total == 0:
            return {}
        page = self._long(command, params, "page")
        size = self._long(command, params, "pagesize")
        if page is not None or size is not None:
            page = max(page or 1, 1)
            if size is None:
                size = DEFAULT_PAGE_SIZE
            if size > 0:
                items = items[(page - 1) * size : page * size]
        if not items:
            return {"count": total}
        return {"count": total, key: items}

    # -- views ---------------------------------------------------------------------------

    def volume_view(self, volume: Volume) -> Body:
        """A volume as listVolumes and the job results show it."""
        offering = self.offerings.get(volume.disk_offering_id or "")
        view: Body = {
            "id": volume.id,
            "name": volume.name,
            "zoneid": self.zone.id,
            "zonename": self.zone.name,
            "type": volume.type,
            "provisioningtype": "thin",
            "size": volume.size,
            "created": volume.created,
            "state": volume.state,
            "account": self.config.account,
            "domainid": self.domain_id,
            "domain": "ROOT",
            "storagetype": "shared",
            "hypervisor": "KVM" if volume.state != "Allocated" else "None",
            "destroyed": False,
            "isextractable": True,
            "displayvolume": True,
            "tags": [],
        }
        if offering is not None:
            view["diskofferingid"] = offering.id
            view["diskofferingname"] = offering.name
            view["diskofferingdisplaytext"] = offering.name
        if volume.vm_id is not None:
            vm = self.vms[volume.vm_id]
            view["virtualmachineid"] = vm.id
            view["vmname"] = vm.name
            view["vmdisplayname"] = vm.name
            view["vmstate"] = vm.state
            view["deviceid"] = volume.device_id
            view["attached"] = volume.attached
        if volume.job_id is not None:
            view["jobid"] = volume.job_id
            view["jobstatus"] = PENDING
        return view

    def vm_view(self, vm: VirtualMachine) -> Body:
        return {
            "id": vm.id,
            "name": vm.name,
            "displayname": vm.name,
            "account": self.config.account,
            "domainid": self.domain_id,
            "domain": "ROOT",
            "created": vm.created,
            "state": vm.state,
            "zoneid": self.zone.id,
            "zonename": self.zone.name,
            "hypervisor": "KVM",
            "serviceofferingname": "Small Instance",
            "cpunumber": 1,
            "cpuspeed": 1000,
            "memory": 1024,
        }

    def job_view(self, job: Job) -> Body:
        view: Body = {
            "accountid": self.account_id,
            "userid": self.user_id,
            "cmd": f"{_CMD_PACKAGE}.volume.{job.command[0].upper()}{job.command[1:]}Cmd",
            "jobstatus": job.status,
            "jobprocstatus": 0,
            "jobresultcode": job.result_code,
            "jobinstancetype": "Volume",
            "created": job.created,
            "jobid": job.id,
        }
        if job.instance_id is not None:
            view["jobinstanceid"] = job.instance_id
        if job.result is not None:
            view["jobresulttype"] = "object"
            view["jobresult"] = job.result
            view["completed"] = job.completed
        return view

    # -- volume commands -----------------------------------------------------------------

    def _create_volume(self, params: Params, fail_job: str | None) -> Body:
        self._check_zone(params)
        offering = self.offerings.get(params["diskofferingid"])
        if offering is None:
            raise invalid_id("diskofferingid", params["diskofferingid"])
        size_gb = self._long("createVolume", params, "size")
        if offering.customized:
            if size_gb is None:
                raise ApiError(PARAM_ERROR, "This disk offering requires a custom size specified")
            if not 1 <= size_gb <= CUSTOM_DISK_MAX_GB:
                raise ApiError(
                    PARAM_ERROR,
                    f"Volume size: {size_gb}GB is out of allowed range. "
                    f"Max: {CUSTOM_DISK_MAX_GB} Min:1",
                )
        elif size_gb is not None and size_gb > 0:
            raise ApiError(PARAM_ERROR, "This disk offering does not allow custom size")
        else:
            size_gb = offering.disk_size_gb
        volume = Volume(
            id=str(uuid.uuid4()),
            name=params["name"],
            size=size_gb * GIB,
            type="DATADISK",
            state="Allocated",
            zone_id=self.zone.id,
            disk_offering_id=offering.id,
            created=timestamp(),
        )
        # The create phase makes the volume at once; the job only reports it.
        self.volumes[volume.id] = volume
        self.mutations[volume.id] += 1

        def run() -> Body:
            if volume.id not in self.volumes:
                raise invalid_id("id", volume.id)
            return {"volume": self.volume_view(volume)}

        def undo() -> None:
            if volume.vm_id is None:
                self.volumes.pop(volume.id, None)

        job = self._submit("createVolume", volume.id, run, fail_job, undo)
        return {"id": volume.id, "jobid": job.id}

    def _attach_volume(self, params: Params, fail_job: str | None) -> Body:
        volume = self._volume(params)
        vm = self._vm(params)
        device_id = self._long("attachVolume", params, "deviceid")
        job = self._submit(
            "attachVolume",
            volume.id,
            lambda: self._attach(volume.id, vm.id, device_id),
            fail_job,
        )
        return {"jobid": job.id}

    def _attach(self, volume_id: str, vm_id: str, requested: int | None) -> Body:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise invalid_id("id", volume_id)
        vm = self.vms[vm_id]
        if volume.vm_id is not None:
            raise ApiError(PARAM_ERROR, ATTACHED_MESSAGE)
        if requested == 0:
            if 0 in vm.devices:
                raise ApiError(PARAM_ERROR, "Vm already has root volume attached to it")
        else:
            data_disks = sum(
                1 for vid in vm.devices.values() if self.volumes[vid].type == "DATADISK"
            )
            limit = self.config.max_data_disks
            if data_disks >= limit:
                raise ApiError(
                    PARAM_ERROR,
                    f"The specified VM already has the maximum number of data disks ({limit}) "
                    "attached. Please specify another VM.",
                )
        device_id = self._device_id(vm, requested)
        volume.vm_id = vm.id
        volume.device_id = device_id
        volume.attached = timestamp()
        volume.state = "Ready"
        if device_id == 0:
            volume.type = "ROOT"
        vm.devices[device_id] = volume.id
        self.mutations[volume.id] += 1
        if self.hooks is not None:
            self.hooks.attached(volume, vm)
        return {"volume": self.volume_view(volume)}

    def _device_id(self, vm: VirtualMachine, requested: int | None) -> int:
        """CloudStack's rule: the lowest free id in 1..max_data_disks+1, never 3 (the CD-ROM)."""
        highest = self.config.max_data_disks + 1
        if requested is not None:
            if requested < 0 or requested > highest or requested == CD_ROM_DEVICE_ID:
                raise ApiError(INTERNAL_ERROR, f"deviceId should be 1,2,4-{highest}", CS_GENERIC)
            if requested in vm.devices:
                raise ApiError(
                    INTERNAL_ERROR, f"deviceId {requested} is used by vm {vm.name}", CS_GENERIC
                )
            return requested
        for candidate in range(1, highest + 1):
            if candidate != CD_ROM_DEVICE_ID and candidate not in vm.devices:
                return candidate
        raise ApiError(INTERNAL_ERROR, f"All device Ids are used by vm {vm.name}", CS_GENERIC)

    def _detach_volume(self, params: Params, fail_job: str | None) -> Body:
        if params.get("id"):
            volume = self._volume(params)
            job = self._submit("detachVolume", volume.id, lambda: self._detach(volume.id), fail_job)
            return {"jobid": job.id}
        vm = self._vm(params) if params.get("virtualmachineid") else None
        device_id = self._long("detachVolume", params, "deviceid")

        def run() -> Body:
            if vm is None or device_id is None:
                raise ApiError(
                    PARAM_ERROR,
                    "Please provide either a volume id, or a tuple(device id, instance id)",
                )
            volume_id = vm.devices.get(device_id)
            if volume_id is None:
                raise ApiError(PARAM_ERROR, NOT_ATTACHED_MESSAGE)
            return self._detach(volume_id)

        instance = vm.devices.get(device_id) if vm is not None and device_id is not None else None
        job = self._submit("detachVolume", instance, run, fail_job)
        return {"jobid": job.id}

    def _detach(self, volume_id: str) -> Body:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise invalid_id("id", volume_id)
        if volume.vm_id is None or volume.device_id is None:
            raise ApiError(PARAM_ERROR, NOT_ATTACHED_MESSAGE)
        vm = self.vms[volume.vm_id]
        vm.devices.pop(volume.device_id, None)
        volume.vm_id = volume.device_id = volume.attached = None
        self.mutations[volume.id] += 1
        if self.hooks is not None:
            self.hooks.detached(volume, vm)
        return {"volume": self.volume_view(volume)}

    def _resize_volume(self, params: Params, fail_job: str | None) -> Body:
        volume = self._volume(params)
        size_gb = self._long("resizeVolume", params, "size")
        if size_gb is not None and size_gb > CUSTOM_DISK_MAX_GB:
            # CloudStack checks a new size against custom.diskoffering.size.max before it
            # starts the job, as createVolume does.
            raise ApiError(
                PARAM_ERROR,
                f"Volume size: {size_gb}GB is out of allowed range. "
                f"Max: {CUSTOM_DISK_MAX_GB} Min:1",
            )
        shrink_ok = self._bool(params, "shrinkok")
        job = self._submit(
            "resizeVolume",
            volume.id,
            lambda: self._resize(volume.id, size_gb, shrink_ok),
            fail_job,
        )
        return {"jobid": job.id}

    def _resize(self, volume_id: str, size_gb: int | None, shrink_ok: bool) -> Body:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise invalid_id("id", volume_id)
        if size_gb is None or size_gb <= 0:
            raise ApiError(PARAM_ERROR, "Please provide either a new size or a new disk offering")
        new_size = size_gb * GIB
        if new_size < volume.size and not shrink_ok:
            raise ApiError(
                PARAM_ERROR,
                f"Going from existing size of {volume.size} to size of {new_size} would shrink "
                "the volume.Need to sign off by supplying the shrinkok parameter with value of "
                "true.",
            )
        if new_size != volume.size:
            volume.size = new_size
            self.mutations[volume.id] += 1
            if self.hooks is not None and volume.vm_id is not None:
                self.hooks.resized(volume, self.vms[volume.vm_id])
        return {"volume": self.volume_view(volume)}

    def _delete_volume(self, params: Params, fail_job: str | None) -> Body:
        volume = self._volume(params)
        if volume.vm_id is not None:
            raise ApiError(PARAM_ERROR, ATTACHED_MESSAGE)
        del self.volumes[volume.id]
        self.mutations[volume.id] += 1
        self.removed[volume.id] = None
        while len(self.removed) > self.config.call_log_size:
            self.removed.popitem(last=False)
        # SuccessResponse.success is a Boolean, serialized by gson as JSON true.
        return {"success": True}

    # -- queries -------------------------------------------------------------------------

    def _list_volumes(self, params: Params, fail_job: str | None) -> Body:
        candidates: Iterable[Volume]
        if params.get("id") in self.removed:
            candidates = []
        elif params.get("id"):
            candidates = [self._volume(params)]
        elif params.get("virtualmachineid"):
            vm = self._vm(params)
            candidates = [self.volumes[vid] for _, vid in sorted(vm.devices.items())]
        else:
            candidates = self.volumes.values()
        self._check_zone(params)
        name = params.get("name")
        keyword = params.get("keyword")
        vtype = params.get("type", "").upper()
        state = params.get("state", "").lower()
        vm_id = params.get("virtualmachineid")
        found = [
            self.volume_view(v)
            for v in candidates
            if (not name or v.name == name)
            and (not keyword or keyword.lower() in v.name.lower())
            and (not vtype or v.type == vtype)
            and (not state or v.state.lower() == state)
            and (not vm_id or v.vm_id == vm_id)
        ]
        return self._page("listVolumes", params, found, "volume")

    def _query_async_job_result(self, params: Params, fail_job: str | None) -> Body:
        job = self.jobs.get(params["jobid"])
        if job is None:
            raise invalid_id("jobid", params["jobid"])
        return self.job_view(job)

    def _list_virtual_machines(self, params: Params, fail_job: str | None) -> Body:
        candidates = [self._vm(params, "id")] if params.get("id") else list(self.vms.values())
        self._check_zone(params)
        name = params.get("name")
        state = params.get("state", "").lower()
        found = [
            self.vm_view(vm)
            for vm in candidates
            if (not name or vm.name == name) and (not state or vm.state.lower() == state)
        ]
        return self._page("listVirtualMachines", params, found, "virtualmachine")

    def _list_zones(self, params: Params, fail_job: str | None) -> Body:
        self._check_zone(params, "id")
        name = params.get("name")
        zones = []
        if not name or name == self.zone.name:
            zones.append(
                {
                    "id": self.zone.id,
                    "name": self.zone.name,
                    "allocationstate": "Enabled",
                    "networktype": "Advanced",
                    "localstorageenabled": False,
                    "securitygroupsenabled": False,
                }
            )
        return self._page("listZones", params, zones, "zone")

    def _list_disk_offerings(self, params: Params, fail_job: str | None) -> Body:
        self._check_zone(params)
        wanted = params.get("id")
        if wanted and wanted not in self.offerings:
            raise invalid_id("id", wanted)
        name = params.get("name")
        found = [
            {
                "id": o.id,
                "name": o.name,
                "displaytext": o.name,
                "disksize": o.disk_size_gb,
                "iscustomized": o.customized,
                "storagetype": "shared",
                "provisioningtype": "thin",
                "created": o.created,
            }
            for o in self.offerings.values()
            if (not wanted or o.id == wanted) and (not name or o.name == name)
        ]
        return self._page("listDiskOfferings", params, found, "diskoffering")

    def _list_capabilities(self, params: Params, fail_job: str | None) -> Body:
        return {
            "capability": {
                "cloudstackversion": self.config.cloudstack_version,
                "securitygroupsenabled": False,
                "userpublictemplateenabled": True,
                "supportELB": "false",
                "projectinviterequired": False,
                "allowusercreateprojects": True,
                "customdiskofferingminsize": 1,
                "customdiskofferingmaxsize": CUSTOM_DISK_MAX_GB,
                "kvmsnapshotenabled": True,
                "apilimitinterval": 1,
                "apilimitmax": 0,
                "allowuserviewdestroyedvm": False,
                "allowuserexpungerecovervm": False,
            }
        }
