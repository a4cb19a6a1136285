"""The REST gateway (contract §7) against a real nats-server, MariaDB, the simulator with a
fake device tree, and every actor: each route as the Go daemon's callers use it, through a
client that decodes as they do (RFC 3339 times, ``error`` a string) and polls an operation
until it is completed, failed or cancelled.

One volumed serves the whole module (its start is most of the cost); the test that stops
NATS runs last and starts it again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal, TypeVar

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from msgspec import Meta, Struct

from actors.gateway import GatewayActor
from actors.gateway.openapi import document, text
from actors.metrics.exporter import CannotListen
from actors.supervisor import ACTORS as SUPERVISED
from actors.supervisor import Supervisor, default_actors
from bus import Bus
from bus.topology import TOPOLOGY
from schemas.commands import CreateCommand
from schemas.common import GIB
from schemas.config import ConfigError, load_settings
from schemas.rest import CreateVolumeRequest
from simulator import SimConfig, Simulator
from tests.conftest import (
    Harness,
    NatsServer,
    VolumedProcess,
    free_port,
    start_volumed,
    stop_volumed,
    volumed_env,
    wait_for,
)
from tests.test_devices_e2e import fake_tree, hotplugging
from tests.test_lifecycle import remote_vm, settings_for
from tests.test_security import SecureNats, as_user, run_supervisor, stop_supervisor

pytestmark = pytest.mark.asyncio(loop_scope="module")

ACTORS = ["persistence", "executor", "watcher", "correlator", "gateway"]
POLL = 0.05  # the Go callers poll every 2 s; the same loop, faster
OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
T = TypeVar("T")

# -- the Go callers' types, decoded strictly -----------------------------------------------

# Go's time.Time: RFC 3339 with an offset, never null where it is not a pointer.
Stamp = Annotated[dt.datetime, Meta(tz=True)]


class GoOperation(Struct):
    id: str
    type: str
    status: Literal["pending", "executing", "completed", "failed", "cancelled"]
    volume_id: str
    vm_id: str | None
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: str | None
    created_at: Stamp
    updated_at: Stamp
    completed_at: Stamp | None


class GoMapping(Struct):
    id: str
    volume_id: str
    vm_id: str
    device_path: str | None
    cloudstack_state: str
    linux_state: str
    size: int | None
    last_sync: Stamp | None
    created_at: Stamp | None
    updated_at: Stamp | None
    proven_at: Stamp | None = None


class GoVmVolume(Struct):
    volume_id: str
    vm_id: str
    device_path: str | None
    attached_at: Stamp | None


class GoVolumeStatus(Struct):
    volume_id: str
    state: str
    size: int | None
    cloudstack_data: dict[str, Any]
    vm_id: str | None = None
    device_path: str | None = None
    last_operation: GoOperation | None = None


class GoHealth(Struct):
    status: str
    timestamp: Stamp
    cloudstack_health: str
    database_health: str
    device_monitor: str
    details: dict[str, str] | None = None


class GoForceSync(Struct):
    message: str
    timestamp: Stamp
    vm_ids: list[str]


class GoError(Struct):
    error: str
    code: str


TERMINAL = ("completed", "failed", "cancelled")


class Rest:
    """An HTTP caller of the gateway, strict as the Go callers' decoder."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, bytes]:
        if body is not None:
            kw["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.request(method, self.base + path, **kw) as r:
            data = await r.read()
            # Every answer, errors included, is JSON: never a traceback or an HTML page.
            assert r.content_type == "application/json", (r.status, data[:200])
            return r.status, data

    async def ok(self, method: str, path: str, kind: type[T], body: Any = None, **kw: Any) -> T:
        status, data = await self.call(method, path, body, **kw)
        expected = 201 if method in ("POST", "DELETE") and kind is GoOperation else 200
        assert status == expected, (status, data)
        return msgspec.json.decode(data, type=kind)

    async def error(
        self, method: str, path: str, status: int, body: Any = None, **kw: Any
    ) -> GoError:
        got, data = await self.call(method, path, body, **kw)
        assert got == status, (got, data)
        return msgspec.json.decode(data, type=GoError)

    async def wait(self, operation_id: str, timeout: float = 30.0) -> GoOperation:
        """Poll GET /operations/{id} until it ends, as the Go callers do (an error answer
        is retried)."""
        async with asyncio.timeout(timeout):
            while True:
                status, data = await self.call("GET", f"/api/v1/operations/{operation_id}")
                if status == 200:
                    op = msgspec.json.decode(data, type=GoOperation)
                    if op.status in TERMINAL:
                        return op
                await asyncio.sleep(POLL)

    async def create(self, sim: Simulator, name: str = "rest", **kw: Any) -> GoOperation:
        body = {
            "name": name,
            "size": GIB,
            "disk_offering_id": sim.disk_offering_ids[0],
            "zone_id": sim.zone_id,
        }
        accepted = await self.ok("POST", "/api/v1/volumes", GoOperation, body, **kw)
        return await self.wait(accepted.id)


async def listening(supervisor: Any) -> None:
    """Until the supervisor's gateway listens (``ready`` means its actors were started)."""
    await wait_for(lambda: "gateway" in supervisor.actors)
    await asyncio.wait_for(supervisor.actors["gateway"].ready.wait(), 10)


# -- one volumed for the module ------------------------------------------------------------


class World:
    def __init__(self, nats: NatsServer, sim: Simulator, harness: Harness, base: str) -> None:
        self.nats = nats
        self.sim = sim
        self.harness = harness
        self.base = base


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("gateway")
    nats = NatsServer(store_dir=tmp / "jetstream")
    nats.start()
    # The gateway never opens the database: the lighter backend serves as well here.
    sqlite = SimpleNamespace(dsn=f"sqlite:///{tmp / 'volumed.db'}")
    sysfs, dev = fake_tree(tmp)
    port = free_port()
    try:
        async with Simulator(hotplugging(sysfs, dev, seed=7, serials=True)) as sim:
            settings = settings_for(
                nats,
                sqlite,  # type: ignore[arg-type]
                sim,
                sysfs=str(sysfs),
                dev=str(dev),
                devices=("vd*",),
                poll_interval=0.05,
                correlation_timeout=5.0,
                detach_timeout=5.0,
                heartbeat_interval=0.5,
                http_addr=f"127.0.0.1:{port}",
            )
            harness, task = await start_volumed(settings, ACTORS, sim)
            try:
                await listening(harness.supervisor)
                yield World(nats, sim, harness, f"http://127.0.0.1:{port}")
            finally:
                await stop_volumed(harness, task)
    finally:
        nats.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def rest(world: World) -> AsyncIterator[Rest]:
    async with aiohttp.ClientSession() as session:
        yield Rest(session, world.base)


# -- commands ------------------------------------------------------------------------------


async def test_post_volumes_answers_201_then_polls_to_completed(world: World, rest: Rest) -> None:
    body = {
        "name": "rest-create",
        "size": 2 * GIB,
        "disk_offering_id": world.sim.disk_offering_ids[0],
        "zone_id": world.sim.zone_id,
        "metadata": {"owner": "go"},
    }
    accepted = await rest.ok("POST", "/api/v1/volumes", GoOperation, body)
    assert accepted.type == "create" and accepted.status in ("pending", "executing", "completed")
    assert accepted.request["name"] == "rest-create"
    done = await rest.wait(accepted.id)
    assert done.status == "completed" and done.error is None, done
    assert done.volume_id and world.sim.volumes[done.volume_id].size == 2 * GIB
    assert done.completed_at is not None and done.completed_at >= done.created_at


async def test_attach_detach_delete_to_a_remote_vm(world: World, rest: Rest) -> None:
    volume = (await rest.create(world.sim, "rest-remote")).volume_id
    vm = remote_vm(world.sim)
    attach = await rest.ok(
        "POST", f"/api/v1/volumes/{volume}/attach", GoOperation, {"vm_id": vm, "vm_name": "x"}
    )
    assert attach.type == "attach" and attach.volume_id == volume and attach.vm_id == vm
    assert (await rest.wait(attach.id)).status == "completed"
    assert world.sim.volumes[volume].vm_id == vm

    listed = await rest.ok("GET", f"/api/v1/vms/{vm}/volumes", list[GoVmVolume])
    mine = [v for v in listed if v.volume_id == volume]
    assert mine and mine[0].device_path is None and mine[0].attached_at is not None

    detach = await rest.ok("POST", f"/api/v1/volumes/{volume}/detach", GoOperation)
    assert (await rest.wait(detach.id)).status == "completed"
    assert world.sim.volumes[volume].vm_id is None

    delete = await rest.ok("DELETE", f"/api/v1/volumes/{volume}", GoOperation)
    assert delete.type == "delete"
    assert (await rest.wait(delete.id)).status == "completed"
    status = await rest.ok("GET", f"/api/v1/volumes/{volume}", GoVolumeStatus)
    assert status.state == "deleted" and status.last_operation is not None
    assert status.last_operation.id == delete.id


async def test_attach_root_asks_for_device_0(world: World, rest: Rest) -> None:
    """Every simulated VM has its root disk: CloudStack refuses a second one at device 0,
    and the caller reads why as a string."""
    volume = (await rest.create(world.sim, "rest-root")).volume_id
    accepted = await rest.ok(
        "POST",
        f"/api/v1/volumes/{volume}/attach-root",
        GoOperation,
        {"vm_id": remote_vm(world.sim)},
    )
    failed = await rest.wait(accepted.id)
    assert failed.status == "failed" and failed.error and "root volume" in failed.error


async def test_local_attach_device_routes_and_force_sync(world: World, rest: Rest) -> None:
    sim, local = world.sim, world.sim.local_vm_id
    volume = (await rest.create(sim, "rest-local")).volume_id
    attach = await rest.ok(
        "POST", f"/api/v1/volumes/{volume}/attach", GoOperation, {"vm_id": local}
    )
    done = await rest.wait(attach.id)
    assert done.status == "completed", done
    _, data = await rest.call("GET", f"/api/v1/operations/{attach.id}")
    device = json.loads(data)["device_path"]
    assert device and device.startswith("/")

    mapping = await rest.ok("GET", f"/api/v1/volumes/{volume}/device", GoMapping)
    assert mapping.device_path == device and mapping.vm_id == local
    assert mapping.linux_state == "present" and mapping.size == GIB
    by_device = await rest.ok("GET", f"/api/v1/devices/{device.lstrip('/')}/volume", GoMapping)
    assert by_device.volume_id == volume

    listed = await rest.ok("GET", f"/api/v1/vms/{local}/volumes", list[GoVmVolume])
    assert [(v.volume_id, v.device_path) for v in listed] == [(volume, device)]
    state = await rest.ok("GET", f"/api/v1/volumes/{volume}", GoVolumeStatus)
    assert state.state == "attached" and state.device_path == device and state.size == GIB

    # force-sync: the correlator proves the mapping again (proven_at moves), at once
    # rather than at its next reconciliation (30 s).
    async def proven_at() -> dt.datetime | None:
        return (await rest.ok("GET", f"/api/v1/volumes/{volume}/device", GoMapping)).proven_at

    before = await wait_for(proven_at, timeout=10)  # the proof that follows every attach
    synced = await rest.ok("POST", "/api/v1/admin/force-sync", GoForceSync)
    assert synced.vm_ids == [local]

    async def proven_again() -> bool:
        after = await proven_at()
        return after is not None and after > before

    await wait_for(proven_again, timeout=10)

    detach = await rest.ok("POST", f"/api/v1/volumes/{volume}/detach", GoOperation)
    assert (await rest.wait(detach.id)).status == "completed"
    await rest.error("GET", f"/api/v1/volumes/{volume}/device", 404)
    assert await rest.ok("GET", f"/api/v1/vms/{local}/volumes", list[GoVmVolume]) == []


async def test_a_command_not_taken_yet_is_201_pending(world: World, rest: Rest) -> None:
    """JetStream has the command but no event came in time (no executor running): the
    answer is the operation as pending, and it becomes the real one."""
    bus = world.harness.supervisor.bus  # type: ignore[attr-defined]
    impatient = GatewayActor(bus, world.harness.settings, "127.0.0.1:0", accept_wait=0)  # type: ignore[arg-type]
    await impatient.start()
    try:
        other = Rest(rest.session, f"http://127.0.0.1:{impatient.port}")
        vm = remote_vm(world.sim)
        accepted = await other.ok(
            "POST", "/api/v1/volumes/v-never/attach", GoOperation, {"vm_id": vm}
        )
        assert accepted.status == "pending" and accepted.completed_at is None
        assert (accepted.volume_id, accepted.vm_id) == ("v-never", vm)
        assert accepted.request["as_root"] is False
        ended = await other.wait(accepted.id)
        assert ended.status == "failed" and ended.error, ended
    finally:
        await impatient.close()


async def test_a_post_nats_does_not_acknowledge_names_its_operation(
    world: World, rest: Rest, nats_server: NatsServer
) -> None:
    """Tried from outside: with nats-server paused, a POST answered 503 "NATS did not
    answer", and the create happened once NATS went on: the caller, told nothing more,
    retried without a key and made a second volume."""
    bus = await Bus.connect(nats_server.url, "test-paused")
    gateway = GatewayActor(bus, world.harness.settings, "127.0.0.1:0")  # type: ignore[arg-type]
    try:
        await bus.provision(TOPOLOGY)
        await gateway.start()
        paused = Rest(rest.session, f"http://127.0.0.1:{gateway.port}")
        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        try:
            lost = await paused.error(
                "POST", "/api/v1/volumes/v-paused/detach", 503, headers={"Idempotency-Key": "p-1"}
            )
        finally:
            os.kill(nats_server.proc.pid, signal.SIGCONT)
        assert "/api/v1/operations/p-1" in lost.error and "Idempotency-Key: p-1" in lost.error
    finally:
        await gateway.close()
        await bus.close()


# -- queries -------------------------------------------------------------------------------


async def test_operations_list_filters(world: World, rest: Rest) -> None:
    created = await rest.create(world.sim, "rest-list")
    ops = await rest.ok(
        "GET", f"/api/v1/operations?volume_id={created.volume_id}&type=create", list[GoOperation]
    )
    assert [op.id for op in ops] == [created.id]
    # Two completed operations at least, whichever tests ran before in this worker (xdist
    # schedules each test on its own).
    await rest.create(world.sim, "rest-list-2")
    some = await rest.ok("GET", "/api/v1/operations?status=completed&limit=2", list[GoOperation])
    assert len(some) == 2 and all(op.status == "completed" for op in some)
    assert await rest.ok("GET", "/api/v1/operations?vm_id=no-such-vm", list[GoOperation]) == []
    one = await rest.ok("GET", f"/api/v1/operations/{created.id}", GoOperation)
    assert one.id == created.id and one.volume_id == created.volume_id


async def test_a_rejected_operation_is_failed_to_a_go_caller(world: World, rest: Rest) -> None:
    """A command some other client sent that volumed rejected: a Go caller polling it must
    stop, so it reads ``failed``, with the reason as a string."""
    op_id = f"nats-{uuid.uuid4().hex[:12]}"
    await world.harness.send("create", {"operation_id": op_id, "name": "x", "size": 5})
    got = await rest.wait(op_id)
    assert got.status == "failed" and got.error and "size" in got.error, got
    _, data = await rest.call("GET", f"/api/v1/operations/{op_id}")
    assert json.loads(data)["error_code"] == "invalid_request"


async def test_health_on_both_paths(world: World, rest: Rest) -> None:
    # Unhealthy (503) until the executor's first heartbeat is in, which may come after the
    # gateway answers (the world's actors start together).
    async def beating() -> bool:
        return (await rest.call("GET", "/health"))[0] == 200

    await wait_for(beating, timeout=15)
    for path in ("/health", "/api/v1/health"):
        health = await rest.ok("GET", path, GoHealth)
        assert health.status in ("healthy", "degraded"), health
        assert health.database_health == "healthy", health
        assert health.details and "nats" in health.details


async def test_health_is_503_while_the_database_is_away(tmp_path: Path) -> None:
    """A Go caller's health check fails (not 200) while volumed cannot write."""
    nats = NatsServer(store_dir=tmp_path / "jetstream")
    nats.start()
    port = free_port()
    try:
        async with Simulator(SimConfig(seed=5)) as sim, aiohttp.ClientSession() as session:
            nowhere = SimpleNamespace(dsn=f"mysql://root@127.0.0.1:{free_port()}/volumed")
            settings = settings_for(nats, nowhere, sim, http_addr=f"127.0.0.1:{port}")  # type: ignore[arg-type]
            supervisor, task = await run_supervisor(settings, ["persistence", "gateway"])
            try:
                await listening(supervisor)
                rest = Rest(session, f"http://127.0.0.1:{port}")

                async def answered() -> GoHealth | None:
                    # 503 in the Go shape from the first answer on, whether persistence
                    # answers the health query yet or not (it starts beside the gateway).
                    got, data = await rest.call("GET", "/health")
                    assert got == 503, data
                    health = msgspec.json.decode(data, type=GoHealth)
                    assert health.status == "unhealthy", health
                    assert health.database_health.startswith("down"), health
                    return health if "database" in health.details else None

                health = await wait_for(answered, timeout=20)
                assert "Can't connect" in health.database_health, health
            finally:
                await stop_supervisor(supervisor, task)
    finally:
        nats.stop()


async def test_health_is_503_in_the_go_shape_while_nothing_answers(tmp_path: Path) -> None:
    """No persistence (not started, or its process gone): a Go caller's health check still
    reads its own shape, unhealthy, never an error body it cannot decode."""
    nats = NatsServer(store_dir=tmp_path / "jetstream")
    nats.start()
    port = free_port()
    try:
        async with Simulator(SimConfig(seed=6)) as sim, aiohttp.ClientSession() as session:
            nowhere = SimpleNamespace(dsn=f"mysql://root@127.0.0.1:{free_port()}/volumed")
            settings = settings_for(nats, nowhere, sim, http_addr=f"127.0.0.1:{port}")  # type: ignore[arg-type]
            supervisor, task = await run_supervisor(settings, ["gateway"])
            try:
                await listening(supervisor)
                rest = Rest(session, f"http://127.0.0.1:{port}")
                for path in ("/health", "/api/v1/health"):
                    got, data = await rest.call("GET", path)
                    assert got == 503, data
                    health = msgspec.json.decode(data, type=GoHealth)
                    assert health.status == "unhealthy", health
                    assert "no answer to the health query" in health.database_health, health
            finally:
                await stop_supervisor(supervisor, task)
    finally:
        nats.stop()


async def test_idempotency_key_makes_one_operation(world: World, rest: Rest) -> None:
    key = f"idem-{uuid.uuid4().hex[:12]}"
    first = await rest.create(world.sim, "rest-idem", headers={"Idempotency-Key": key})
    assert first.id == key and first.status == "completed"
    # The caller retries (its answer was lost): the same operation, no second volume.
    again = await rest.create(world.sim, "rest-idem", headers={"Idempotency-Key": key})
    assert again.id == key and again.volume_id == first.volume_id
    assert [v.name for v in world.sim.volumes.values()].count("rest-idem") == 1
    # The same key for another command is a conflict, and nothing is done for it.
    conflict = await rest.error(
        "POST",
        f"/api/v1/volumes/{first.volume_id}/detach",
        409,
        headers={"Idempotency-Key": key},
    )
    assert conflict.code == "conflict"
    other = await rest.error(
        "POST",
        "/api/v1/volumes",
        409,
        {
            "name": "rest-other",
            "size": GIB,
            "disk_offering_id": world.sim.disk_offering_ids[0],
            "zone_id": world.sim.zone_id,
        },
        headers={"Idempotency-Key": key},
    )
    assert other.code == "conflict"
    assert "rest-other" not in [v.name for v in world.sim.volumes.values()]
    bad = await rest.error(
        "POST", "/api/v1/volumes", 400, {"name": "x"}, headers={"Idempotency-Key": "no spaces"}
    )
    assert "Idempotency-Key" in bad.error


async def test_a_key_naming_a_rejected_command_of_another_type_is_a_conflict(
    world: World, rest: Rest
) -> None:
    """Tried from outside: an Idempotency-Key that was the operation id of a resize rejected
    for its size answered a detach 400 "size: expected `int`, got `str`"."""
    key = f"idem-rej-{uuid.uuid4().hex[:8]}"
    await world.harness.send("resize", {"operation_id": key, "volume_id": "v-1", "size": "2G"})
    assert (await world.harness.terminal(key))["status"] == "rejected"
    conflict = await rest.error(
        "POST", "/api/v1/volumes/v-1/detach", 409, headers={"Idempotency-Key": key}
    )
    assert conflict.code == "conflict" and "expected" not in conflict.error, conflict


# -- errors --------------------------------------------------------------------------------


async def test_bad_json_and_wrong_types_are_400_naming_the_field(world: World, rest: Rest) -> None:
    sim = world.sim
    good = {"name": "v", "size": GIB, "disk_offering_id": sim.disk_offering_ids[0]}
    good["zone_id"] = sim.zone_id
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/api/v1/volumes", b"{not json", "not valid JSON"),
        ("POST", "/api/v1/volumes", b"", "empty"),
        ("POST", "/api/v1/volumes", [1, 2], "JSON object"),
        ("POST", "/api/v1/volumes", {**good, "size": "ten"}, "size"),
        ("POST", "/api/v1/volumes", {**good, "size": GIB + 1}, "size: must be a positive whole"),
        ("POST", "/api/v1/volumes", {k: v for k, v in good.items() if k != "zone_id"}, "zone_id"),
        ("POST", "/api/v1/volumes/v-1/attach", {"vm_id": 5}, "vm_id"),
        ("POST", "/api/v1/volumes/v-1/attach-root", {}, "vm_id"),
        ("GET", "/api/v1/operations?limit=many", None, "limit"),
        ("GET", "/api/v1/operations?status=lost", None, "status"),
    ]
    for method, path, body, words in cases:
        got = await rest.error(method, path, 400, body)
        assert got.code == "invalid_request" and words in got.error, (path, body, got)


async def test_unknown_ids_and_routes_are_404(world: World, rest: Rest) -> None:
    unknown = str(uuid.uuid4())
    for path in (
        f"/api/v1/operations/{unknown}",
        "/api/v1/operations/not%20an%20id",
        f"/api/v1/volumes/{unknown}",
        f"/api/v1/volumes/{unknown}/device",
        "/api/v1/devices/dev/vdzz/volume",
        "/api/v1/no-such-route",
    ):
        got = await rest.error("GET", path, 404)
        assert got.code == "not_found" and got.error, (path, got)
    wrong = await rest.error("PUT", "/api/v1/volumes", 405)
    assert wrong.code == "method_not_allowed"


async def test_bodies_over_64_kib_are_413(world: World, rest: Rest) -> None:
    big = {"name": "big", "metadata": {"k": "x" * (65 * 1024)}}
    for method, path in (("POST", "/api/v1/volumes"), ("POST", "/api/v1/volumes/v-1/detach")):
        got = await rest.error(method, path, 413, big)
        assert got.code == "too_large" and "64 KiB" in got.error


async def test_routes_volumed_does_not_offer_are_501(world: World, rest: Rest) -> None:
    for method, path in (
        ("POST", "/api/v1/snapshots/track"),
        ("GET", "/api/v1/snapshots/vm/ctx-1"),
        ("POST", "/api/v1/exports"),
        ("GET", "/api/v1/exports/orphaned/count"),
        ("POST", "/api/v1/cleanup/test-failover"),
        ("GET", "/api/v1/metrics"),
    ):
        got = await rest.error(method, path, 501)
        assert got.code == "not_implemented" and f"{method} {path}" in got.error


# -- OpenAPI -------------------------------------------------------------------------------


async def test_openapi_document_is_checked_in() -> None:
    """docs/openapi.json is what the types make: regenerate it with
    `python -m actors.gateway > docs/openapi.json`."""
    assert OPENAPI.read_text() == text()
    doc = document()
    assert doc["openapi"].startswith("3.1")
    for path in ("/api/v1/volumes", "/api/v1/operations/{id}", "/api/v1/devices/{path}/volume"):
        assert path in doc["paths"], path
    assert "RestOperation" in doc["components"]["schemas"]


async def test_the_documented_create_body_is_the_create_command() -> None:
    """The gateway decodes a create as the command it is (its refusals then read the same
    as the command's); the type the document shows must not drift from it."""
    _, found = msgspec.json.schema_components([CreateCommand, CreateVolumeRequest])
    command, request = found["CreateCommand"], found["CreateVolumeRequest"]
    del command["properties"]["operation_id"]
    for key in ("title", "description"):
        command.pop(key, None), request.pop(key, None)
    assert request == command


async def test_openapi_is_served(world: World, rest: Rest) -> None:
    status, data = await rest.call("GET", "/api/v1/openapi.json")
    assert status == 200 and json.loads(data) == json.loads(OPENAPI.read_text())


async def test_a_port_in_use_stops_the_gateway_naming_the_setting(world: World) -> None:
    """`volumed run gateway` where the port is taken (here: by the module's gateway) ends
    with CannotListen, which the command line reports with exit code 2."""
    settings = world.harness.settings
    supervisor = Supervisor(settings, ["gateway"])  # type: ignore[arg-type]
    with pytest.raises(CannotListen, match=f"VOLUMED_HTTP_ADDR={settings.http_addr}"):  # type: ignore[attr-defined]
        await asyncio.wait_for(supervisor.run(), 30)


async def test_volumed_http_addr_adds_the_gateway_to_volumed_run() -> None:
    assert default_actors(load_settings(environ={})) == list(SUPERVISED)
    settings = load_settings(environ={"VOLUMED_HTTP_ADDR": "127.0.0.1:8090"})
    assert settings.http_addr == "127.0.0.1:8090"
    assert default_actors(settings) == [*SUPERVISED, "gateway"]
    with pytest.raises(ConfigError, match="VOLUMED_HTTP_ADDR"):
        load_settings(environ={"VOLUMED_HTTP_ADDR": "8090"})


# -- from outside: `volumed run` as a new user runs it -------------------------------------


async def test_volumed_run_serves_the_api_with_volumed_http_addr(tmp_path: Path) -> None:
    """VOLUMED_HTTP_ADDR adds the gateway to `volumed run`: a Go caller creates a volume
    through it."""
    nats = NatsServer(store_dir=tmp_path / "jetstream")
    nats.start()
    sysfs, _ = fake_tree(tmp_path)
    port = free_port()
    try:
        async with Simulator(SimConfig(seed=2)) as sim, aiohttp.ClientSession() as session:
            env = volumed_env(
                nats.url,
                f"sqlite:///{tmp_path / 'volumed.db'}",
                sim,
                VOLUMED_HTTP_ADDR=f"127.0.0.1:{port}",
                VOLUMED_SYSFS=str(sysfs),
                VOLUMED_DEVICES="vd*",
            )
            process = VolumedProcess(env, (), log_path=tmp_path / "log")
            await process.start()
            try:
                rest = Rest(session, f"http://127.0.0.1:{port}")

                async def up() -> bool:
                    try:
                        status, _ = await rest.call("GET", "/health")
                    except aiohttp.ClientConnectionError:
                        return False
                    return status == 200

                await wait_for(up, timeout=20, interval=0.1)
                assert (await rest.create(sim, "from-outside")).status == "completed"
            finally:
                assert await process.stop() == 0
    finally:
        nats.stop()


async def test_the_gateway_user_is_granted_what_the_gateway_does(tmp_path: Path) -> None:
    """The gateway logged in as the `gateway` user of deploy/nats-accounts/ (volumed's
    actors as admin): a create, a query, health and force-sync, and no permission
    violation on the server."""
    server = SecureNats(tmp_path / "nats")
    server.start()
    port = free_port()
    try:
        async with Simulator(SimConfig(seed=4)) as sim, aiohttp.ClientSession() as session:
            sqlite = SimpleNamespace(dsn=f"sqlite:///{tmp_path / 'volumed.db'}")
            base = settings_for(server, sqlite, sim, http_addr=f"127.0.0.1:{port}")  # type: ignore[arg-type]
            actors = await run_supervisor(
                as_user(base, server, "admin"), ["persistence", "executor", "correlator"]
            )
            gateway = await run_supervisor(as_user(base, server, "gateway"), ["gateway"])
            try:
                await listening(gateway[0])
                rest = Rest(session, f"http://127.0.0.1:{port}")
                key = f"secure-{uuid.uuid4().hex[:8]}"
                done = await rest.create(sim, "secure", headers={"Idempotency-Key": key})
                assert done.status == "completed" and done.id == key
                assert (await rest.ok("GET", f"/api/v1/operations/{key}", GoOperation)).id == key
                await rest.ok("GET", "/health", GoHealth)
                await rest.ok("POST", "/api/v1/admin/force-sync", GoForceSync)
            finally:
                await stop_supervisor(*gateway)
                await stop_supervisor(*actors)
    finally:
        server.stop()
    assert server.violations() == []


# -- last: NATS away -----------------------------------------------------------------------


async def test_nats_away_is_503(world: World, rest: Rest) -> None:
    world.nats.stop()
    try:
        bus = world.harness.supervisor.bus  # type: ignore[attr-defined]
        await wait_for(lambda: not bus.connected, timeout=10)
        for method, path, body in (
            ("GET", "/health", None),
            ("GET", "/api/v1/operations/some-op", None),
            ("GET", "/api/v1/operations", None),
            ("POST", "/api/v1/volumes/v-1/detach", None),
            ("POST", "/api/v1/admin/force-sync", None),
        ):
            got = await rest.error(method, path, 503, body)
            assert got.code == "unavailable" and "NATS" in got.error, (path, got)
    finally:
        world.nats.start()
    # Back: the gateway answers again over its reconnected connection.

    async def healthy() -> bool:
        status, _ = await rest.call("GET", "/health")
        return status == 200

    await wait_for(healthy, timeout=20, interval=0.1)


async def test_a_mapping_is_never_updated_before_it_was_created() -> None:
    """Tried from outside: a proven mapping answered ``updated_at`` (its proof, written a
    moment before the row) earlier than ``created_at`` (its last write)."""
    from actors.gateway import shapes
    from schemas.queries import Mapping

    m = Mapping(
        volume_id="v-1",
        vm_id="vm-1",
        device_path="/dev/vdb",
        by_id_path=None,
        size=GIB,
        last_sync="2026-12-07T03:35:31.808752Z",
        proof="serial",
        proven_at="2026-12-07T03:35:31.807361Z",
    )
    shown = shapes.mapping(m)
    assert shown.created_at is not None and shown.updated_at is not None
    assert shown.updated_at >= shown.created_at
    later = msgspec.structs.replace(m, proven_at="2026-12-07T03:40:00.000000Z")
    assert shapes.mapping(later).updated_at == "2026-12-07T03:40:00.000000Z"
