"""The HTTP face of the simulator: CloudStack's API at /client/api, test controls at /_sim/."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web

from simulator.calllog import Call, CallLog
from simulator.config import SimConfig, guest_configs
from simulator.faults import Fault, FaultBook
from simulator.hotplug import Hotplug
from simulator.signing import verify
from simulator.world import (
    COMMANDS,
    CS_GENERIC,
    INTERNAL_ERROR,
    ApiError,
    Body,
    VirtualMachine,
    Volume,
    World,
    response_key,
)

log = logging.getLogger(__name__)

API_PATH = "/client/api"
CONTROL_PATH = "/_sim"
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
UNAUTHORIZED_TEXT = "unable to verify user credentials and/or request signature"

_encode = msgspec.json.encode
_faults_decoder = msgspec.json.Decoder(Fault | list[Fault])


class _Latency(msgspec.Struct, forbid_unknown_fields=True):
    seconds: float
    command: str | None = None


class _GuestDevices:
    """Hot-plugs devices for the volumes attached to a guest VM (a host volumed runs on),
    each into its own VM's tree."""

    def __init__(self, hotplugs: dict[str, Hotplug]) -> None:
        self.hotplugs = hotplugs

    def _of(self, vm: VirtualMachine) -> Hotplug | None:
        return self.hotplugs.get(vm.id) if vm.state == "Running" else None

    def attached(self, volume: Volume, vm: VirtualMachine) -> None:
        if (hotplug := self._of(vm)) is not None:
            hotplug.plug(volume.id, volume.size)

    def detached(self, volume: Volume, vm: VirtualMachine) -> None:
        if (hotplug := self._of(vm)) is not None:
            hotplug.unplug(volume.id)

    def resized(self, volume: Volume, vm: VirtualMachine) -> None:
        if (hotplug := self._of(vm)) is not None:
            hotplug.resize(volume.id, volume.size)


class Simulator:
    """A CloudStack API server with one seeded account, zone, offerings and VMs.

    ``async with Simulator(SimConfig(...)) as sim:`` then point the real ``cs`` client at
    ``sim.url`` with ``sim.api_key`` and ``sim.secret_key``.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.world = World(self.config)
        self.hotplugs: dict[str, Hotplug] = {
            vm_id: self._hotplug(guest.sysfs_root, guest.dev_root)
            for vm_id, guest in zip(
                self.world.guest_vm_ids, guest_configs(self.config), strict=True
            )
        }
        """VM id -> the hot-plug of that guest's tree, in guest order."""
        self.hotplug = next(iter(self.hotplugs.values()), None) or self._hotplug(None, None)
        """The first guest's (the local VM's); a disabled one when there is no guest."""
        self.world.hooks = _GuestDevices(self.hotplugs)
        self.faults = FaultBook()
        self.call_log = CallLog(self.config.call_log_size)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()

    def _hotplug(self, sysfs_root: str | None, dev_root: str | None) -> Hotplug:
        return Hotplug(
            sysfs_root,
            dev_root,
            serials=self.config.serials,
            bus=self.config.bus,
            hotplug_delay=self.config.hotplug_delay,
            unplug_delay=self.config.unplug_delay,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on config.host:config.port (0: an ephemeral port)."""
        app = web.Application()
        app.router.add_route("GET", API_PATH, self._api)
        app.router.add_route("POST", API_PATH, self._api)
        app.router.add_get(f"{CONTROL_PATH}/calls", self._get_calls)
        app.router.add_get(f"{CONTROL_PATH}/mutations", self._get_mutations)
        app.router.add_get(f"{CONTROL_PATH}/volumes", self._get_volumes)
        app.router.add_get(f"{CONTROL_PATH}/world", self._get_world)
        app.router.add_get(f"{CONTROL_PATH}/faults", self._get_faults)
        app.router.add_post(f"{CONTROL_PATH}/faults", self._post_faults)
        app.router.add_delete(f"{CONTROL_PATH}/faults", self._delete_faults)
        app.router.add_post(f"{CONTROL_PATH}/latency", self._post_latency)
        app.router.add_post(f"{CONTROL_PATH}/reset", self._post_reset)
        self._closing.clear()
        for hotplug in self.hotplugs.values():
            hotplug.prepare()
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("CloudStack simulator listening at %s", self.url)

    async def stop(self) -> None:
        """Stop answering; pending jobs and device changes are dropped, devices stay."""
        self._closing.set()
        self.world.cancel_timers()
        for hotplug in self.hotplugs.values():
            hotplug.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what tests read -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API endpoint, e.g. http://127.0.0.1:8080/client/api."""
        return self.base_url + API_PATH

    @property
    def control_url(self) -> str:
        return self.base_url + CONTROL_PATH

    @property
    def api_key(self) -> str:
        return self.world.api_key

    @property
    def secret_key(self) -> str:
        return self.world.secret_key

    @property
    def zone_id(self) -> str:
        return self.world.zone.id

    @property
    def disk_offering_ids(self) -> list[str]:
        """Ids of the disk offerings in config order (the first is customized by default)."""
        return list(self.world.offerings)

    @property
    def vm_ids(self) -> list[str]:
        return list(self.world.vms)

    @property
    def local_vm_id(self) -> str | None:
        return self.world.local_vm_id

    @property
    def calls(self) -> list[Call]:
        """The call log, oldest first (a copy)."""
        return list(self.call_log)

    @property
    def volumes(self) -> dict[str, Volume]:
        """Every volume by id, ROOT disks included (a copy of the index; live objects)."""
        return dict(self.world.volumes)

    @property
    def mutations(self) -> dict[str, int]:
        """Changes applied per volume id: create, attach, detach, resize, delete."""
        return dict(self.world.mutations)

    @property
    def devices(self) -> dict[str, str]:
        """volume id -> name of its hot-plugged device in the local VM (the first guest),
        for the devices present now."""
        return dict(self.hotplug.devices)

    @property
    def guests(self) -> dict[str, tuple[str | None, str | None]]:
        """VM id -> (sysfs root, dev root) of every guest, the local VM's first."""
        return {
            vm_id: (
                str(h.sysfs_root) if h.sysfs_root is not None else None,
                str(h.dev_root) if h.dev_root is not None else None,
            )
            for vm_id, h in self.hotplugs.items()
        }

    def plugged_into(self, vm_id: str) -> list[tuple[str, str]]:
        """(volume id, device name) of every device made in guest ``vm_id``, oldest first."""
        hotplug = self.hotplugs.get(vm_id)
        return list(hotplug.plugged) if hotplug is not None else []

    def devices_of(self, vm_id: str) -> dict[str, str]:
        """volume id -> name of its device present now in guest ``vm_id`` ({}: no guest)."""
        hotplug = self.hotplugs.get(vm_id)
        return dict(hotplug.devices) if hotplug is not None else {}

    def guest_views(self) -> list[Body]:
        """The guests as the ready line and /_sim/world show them."""
        return [
            {"vm_id": vm_id, "sysfs": sysfs, "dev": dev}
            for vm_id, (sysfs, dev) in self.guests.items()
        ]

    def volume_view(self, volume_id: str) -> Body:
        """A volume as listVolumes shows it."""
        return self.world.volume_view(self.world.volumes[volume_id])

    # -- what tests change ---------------------------------------------------------------

    def inject(self, fault: Fault | None = None, /, **fields: Any) -> Fault:
        """Make the next calls fail: ``inject(Fault(kind="http", status=503))`` or
        ``inject(kind="drop", command="attachVolume", count=2)``."""
        if fault is None:
            fault = msgspec.convert(fields, Fault)
        elif fields:
            raise TypeError("pass a Fault or its fields, not both")
        self.faults.add(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_latency(self, seconds: float, command: str | None = None) -> None:
        """Seconds jobs of ``command`` (None: every command without its own) stay pending."""
        self.world.set_latency(seconds, command)

    def reset(self) -> None:
        """Back to the seeded world: no volumes, jobs, calls, faults or devices."""
        for hotplug in self.hotplugs.values():
            hotplug.clear()
        self.world.reset()
        self.faults.clear()
        self.call_log.clear()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no job is pending and no device is about to appear or go."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                # A completing job may schedule a device change, so look again after each.
                deadlines = [self.world.last_deadline()]
                deadlines += [h.last_deadline() for h in self.hotplugs.values()]
                pending = [d for d in deadlines if d is not None]
                if not pending:
                    return
                await asyncio.sleep(max(pending) - loop.time() + 0.001)

    def client(self, **kwargs: Any) -> Any:
        """A real ``cs.AIOCloudStack`` for this simulator, polling jobs every 10 ms."""
        from cs import AIOCloudStack

        options: dict[str, Any] = {
            "endpoint": self.url,
            "key": self.api_key,
            "secret": self.secret_key,
            "fetch_result": True,
            "poll_interval": 0.01,
            "job_timeout": 30,
        }
        options.update(kwargs)
        return AIOCloudStack(**options)

    # -- the API -------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        params: dict[str, str] = {}
        for name, value in request.query.items():
            params.setdefault(name, value)
        if request.method == "POST":
            for name, field in (await request.post()).items():
                if isinstance(field, str):
                    params.setdefault(name, field)
        command = params.get("command")
        call = self.call_log.record(time.time(), request.method, params)
        spec = COMMANDS.get(command or "")
        fault = self.faults.take(command, spec is not None and spec.is_async)
        fail_job = None
        if fault is not None:
            call.fault = fault.kind
            if fault.kind == "drop":
                return self._drop(request)
            if fault.kind == "hang" and await self._hang(fault.seconds):
                return self._drop(request)
            if fault.kind == "http":
                return self._http_fault(call, fault)
            if fault.kind == "job":
                fail_job = fault.text()
        status, body = self._answer(command, params, fail_job)
        call.status = status
        if fault is not None and fault.kind == "job" and status != 200:
            # Refused before any job started: the fault waits for a call that makes one.
            self.faults.refund(fault)
            call.fault = None
        if status == 200:
            call.accepted = True
            call.jobid = body.get("jobid")
            if command == "createVolume":
                call.volume_id = body.get("id")
        else:
            call.errortext = body.get("errortext")
        log.debug("%s %s -> %s", request.method, command, status)
        if fault is not None and fault.kind == "accept_then_drop":
            call.status = None
            return self._drop(request)
        if (
            fault is not None
            and fault.kind == "accept_then_hang"
            and await self._hang(fault.seconds)
        ):
            call.status = None
            return self._drop(request)
        return web.Response(
            body=_encode({response_key(command): body}),
            status=status,
            headers={"Content-Type": JSON_CONTENT_TYPE},
        )

    def _answer(
        self, command: str | None, params: dict[str, str], fail_job: str | None
    ) -> tuple[int, Body]:
        # CloudStack refuses unknown commands while verifying the request, hence 401.
        if command not in COMMANDS or not verify(params, self.world.secrets, datetime.now(UTC)):
            # CloudStack's servlet writes this error without a cserrorcode; 0 stands for none.
            return 401, {
                "uuidList": [],
                "errorcode": 401,
                "cserrorcode": 0,
                "errortext": UNAUTHORIZED_TEXT,
            }
        try:
            return 200, self.world.execute(command, params, fail_job)
        except ApiError as e:
            return e.errorcode, {
                "uuidList": [],
                "errorcode": e.errorcode,
                "cserrorcode": e.cserrorcode,
                "errortext": e.errortext,
            }
        except Exception:
            # A simulator bug: answer as CloudStack answers its own, and say so in the log.
            log.exception("simulator failure in %s", command)
            return INTERNAL_ERROR, {
                "uuidList": [],
                "errorcode": INTERNAL_ERROR,
                "cserrorcode": CS_GENERIC,
                "errortext": "Internal error executing command, please contact your system "
                "administrator",
            }

    def _http_fault(self, call: Call, fault: Fault) -> web.Response:
        call.status = fault.status
        call.errortext = fault.text()
        if fault.wants_json():
            body = {
                "uuidList": [],
                "errorcode": fault.status,
                "cserrorcode": 9999,
                "errortext": fault.text(),
            }
            return web.Response(
                body=_encode({response_key(call.command): body}),
                status=fault.status,
                headers={"Content-Type": JSON_CONTENT_TYPE},
            )
        html = f"<html><body><h1>{fault.status}</h1><p>{fault.text()}</p></body></html>"
        return web.Response(text=html, status=fault.status, content_type="text/html")

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    async def _hang(self, seconds: float | None) -> bool:
        """Answer nothing for ``seconds`` (None: until stopped); True when the simulator is
        stopping meanwhile."""
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return False
        return True

    # -- the control API -----------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=_encode(data), status=status, headers={"Content-Type": JSON_CONTENT_TYPE}
        )

    async def _get_calls(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        command = query.pop("command", None)
        try:
            since = int(query.pop("since", "0"))
        except ValueError:
            return self._json({"error": "since must be an integer"}, 400)
        calls = self.call_log.select(command, since, **query)
        return self._json({"count": len(calls), "calls": calls})

    async def _get_mutations(self, request: web.Request) -> web.Response:
        calls = self.call_log.mutations(request.query.get("volume_id"))
        return self._json({"count": len(calls), "calls": calls})

    async def _get_volumes(self, request: web.Request) -> web.Response:
        views = [self.world.volume_view(v) for v in self.world.volumes.values()]
        return self._json(
            {
                "volumes": views,
                "mutations": self.mutations,
                "devices": self.devices,
                "guest_devices": {vm_id: self.devices_of(vm_id) for vm_id in self.hotplugs},
            }
        )

    async def _get_world(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "endpoint": self.url,
                "key": self.api_key,
                "zone_id": self.zone_id,
                "disk_offering_ids": self.disk_offering_ids,
                "vm_ids": self.vm_ids,
                "local_vm_id": self.local_vm_id,
                "guests": self.guest_views(),
                "pending_jobs": self.world.pending_jobs(),
            }
        )

    async def _get_faults(self, request: web.Request) -> web.Response:
        return self._json({"faults": self.faults.pending()})

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            decoded = _faults_decoder.decode(await request.read())
        except msgspec.ValidationError as e:
            return self._json({"error": str(e)}, 400)
        except msgspec.DecodeError as e:
            return self._json({"error": f"malformed JSON: {e}"}, 400)
        for fault in decoded if isinstance(decoded, list) else [decoded]:
            self.faults.add(fault)
        return self._json({"faults": self.faults.pending()})

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return self._json({"faults": []})

    async def _post_latency(self, request: web.Request) -> web.Response:
        try:
            latency = msgspec.json.decode(await request.read(), type=_Latency)
            self.set_latency(latency.seconds, latency.command)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            return self._json({"error": str(e)}, 400)
        return self._json({"seconds": latency.seconds, "command": latency.command})

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return self._json({"reset": True})
