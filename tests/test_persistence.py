"""The persistence actor against a real nats-server and a real MariaDB (and SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomysql
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.persistence import PersistenceActor, Store, open_store
from actors.persistence.backends import open_backend
from actors.persistence.errors import StoreRefused, StoreUnavailable
from actors.persistence.records import Event, OperationRow, merge, parse_time
from bus import Bus
from bus.topology import (
    CONFIG_SUBJECT,
    CREATES_SUBJECT,
    DEAD_LETTERS,
    HEALTH_BUCKET,
    PERSISTENCE,
    TOPOLOGY,
    event_subject,
)
from schemas.common import GIB
from schemas.config import Settings
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import (
    CheckResult,
    CloudStackCredentials,
    CreatesInDoubt,
    CreatesQuery,
    Heartbeat,
)
from tests.conftest import MARIADB_HOST, MARIADB_PORT, Database, NatsServer, free_port, wait_for

BASE = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> str:
    return (BASE + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ev(op: str, type_: str, status: str, t: float, **fields: Any) -> OperationEvent:
    return OperationEvent(operation_id=op, type=type_, status=status, at=at(t), **fields)  # type: ignore[arg-type]


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "test")
    await b.provision(TOPOLOGY)
    yield b
    await b.close()


@contextlib.asynccontextmanager
async def running(
    bus: Bus, dsn: str, store: Store | None = None, *, wait_consuming: bool = True
) -> AsyncIterator[PersistenceActor]:
    actor = PersistenceActor(bus, Settings(db_dsn=dsn), store=store, instance="test")
    task = asyncio.create_task(actor.run())
    if wait_consuming:
        await wait_for(lambda: actor.consumer is not None or task.done())
    else:
        await wait_for(lambda: actor.store_error != "connecting" or task.done())
    assert not task.done(), task.exception()
    try:
        yield actor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Rows:
    """Reads the tables directly, on either database."""

    def __init__(self, dsn: str, database: Database | None) -> None:
        self.dsn = dsn
        self.database = database

    async def __call__(self, sql: str) -> list[dict[str, Any]]:
        if self.database is not None:
            return await self.database.query(sql)
        db = sqlite3.connect(self.dsn.removeprefix("sqlite://"))
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(sql).fetchall()]
        finally:
            db.close()

    async def op(self, op_id: str) -> dict[str, Any] | None:
        rows = await self(f"SELECT * FROM volume_operations WHERE id = '{op_id}'")
        return rows[0] if rows else None

    async def mapping(self, volume_id: str) -> dict[str, Any] | None:
        rows = await self(f"SELECT * FROM device_mappings WHERE volume_id = '{volume_id}'")
        return rows[0] if rows else None


@pytest.fixture(params=["mysql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Database | None]:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/x.db", None
    db: Database = request.getfixturevalue("database")
    return db.dsn, db


async def request(bus: Bus, endpoint: str, body: Any) -> Any:
    return json.loads(await bus.request(f"volume.api.{endpoint}", body))


async def error_code(bus: Bus, endpoint: str, body: bytes) -> tuple[str, str]:
    msg = await bus.nc.request(f"volume.api.{endpoint}", body, timeout=5)
    headers = msg.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


async def publish_all(bus: Bus, events: list[OperationEvent]) -> None:
    for e in events:
        await bus.publish(event_subject(e.operation_id), e)


# -- events into rows -----------------------------------------------------------------------


async def test_lifecycle_forward_only_and_idempotent(
    bus: Bus, backend: tuple[str, Database | None]
) -> None:
    dsn, database = backend
    rows = Rows(dsn, database)
    async with running(bus, dsn):
        await publish_all(
            bus,
            [
                ev("op-1", "create", "pending", 0, request={"name": "v1", "size": 1073741824}),
                ev("op-1", "create", "executing", 1),
            ],
        )
        await wait_for(lambda: _status(rows, "op-1", "executing"))
        done = ev("op-1", "create", "completed", 2, volume_id="vol-1", response={"id": "vol-1"})
        await publish_all(bus, [done, done, done])
        await wait_for(lambda: _status(rows, "op-1", "completed"))
        first = await rows.op("op-1")
        assert first is not None
        # A late executing (redelivered) and the same terminal event again change nothing.
        await publish_all(bus, [ev("op-1", "create", "executing", 1.5), done])
        await publish_all(bus, [ev("marker", "create", "pending", 3)])
        await wait_for(lambda: rows.op("marker"))
        assert await rows.op("op-1") == first
        assert (await rows("SELECT COUNT(*) AS n FROM volume_operations WHERE id = 'op-1'"))[0][
            "n"
        ] == 1

        assert first["status"] == "completed" and first["type"] == "create"
        assert first["volume_id"] == "vol-1"
        assert json.loads(first["request"]) == {"name": "v1", "size": 1073741824}
        assert json.loads(first["response"]) == {"id": "vol-1"}
        assert first["error"] is None
        assert _dt(first["created_at"]) == parse_time(at(0))
        assert _dt(first["completed_at"]) == parse_time(at(2))

        # A failure keeps its error; a first event that is already terminal also works.
        failed = ev(
            "op-2",
            "attach",
            "failed",
            5,
            volume_id="vol-9",
            vm_id="vm-1",
            error=ErrorInfo(code="not_found", message="volume vol-9 does not exist"),
        )
        await publish_all(bus, [failed, ev("op-2", "attach", "pending", 4, request={"x": 1})])
        await wait_for(lambda: rows.op("op-2"))
        await wait_for(lambda: _field(rows, "op-2", "request"))
        two = await rows.op("op-2")
        assert two is not None and two["status"] == "failed"
        assert json.loads(two["error"]) == {
            "code": "not_found",
            "message": "volume vol-9 does not exist",
        }
        assert _dt(two["created_at"]) == parse_time(at(4))  # the earliest event
        assert _dt(two["completed_at"]) == parse_time(at(5))


async def _status(rows: Rows, op: str, status: str) -> bool:
    row = await rows.op(op)
    return row is not None and row["status"] == status


async def _field(rows: Rows, op: str, name: str) -> bool:
    row = await rows.op(op)
    return row is not None and row[name] is not None


def _dt(value: Any) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)


async def test_device_mappings_follow_attach_and_detach(
    bus: Bus, backend: tuple[str, Database | None]
) -> None:
    dsn, database = backend
    rows = Rows(dsn, database)
    async with running(bus, dsn):
        local = ev(
            "a-local",
            "attach",
            "completed",
            10,
            volume_id="vol-local",
            vm_id="vm-here",
            device_path="/dev/vdb",
            by_id_path="/dev/disk/by-id/virtio-vollocal",
            size=5 * 2**30,
        )
        remote1 = ev("a-r1", "attach", "completed", 11, volume_id="vol-r1", vm_id="vm-far", size=1)
        remote2 = ev("a-r2", "attach", "completed", 12, volume_id="vol-r2", vm_id="vm-far", size=2)
        await publish_all(bus, [local, remote1, remote2])
        await wait_for(lambda: rows.mapping("vol-r2"))
        m = await rows.mapping("vol-local")
        assert m is not None
        assert (m["vm_id"], m["device_path"], m["by_id_path"], m["size"]) == (
            "vm-here",
            "/dev/vdb",
            "/dev/disk/by-id/virtio-vollocal",
            5 * 2**30,
        )
        assert m["operation_id"] == "a-local" and m["last_sync"] is not None
        # Two remote volumes of one VM: both NULL device paths, no collision.
        far = await rows("SELECT * FROM device_mappings WHERE vm_id = 'vm-far'")
        assert sorted(r["volume_id"] for r in far) == ["vol-r1", "vol-r2"]
        assert all(r["device_path"] is None for r in far)

        reply = await request(bus, "vm_volumes", {"vm_id": "vm-far"})
        assert [v["volume_id"] for v in reply["volumes"]] == ["vol-r1", "vol-r2"]

        # Detach and delete completed remove the mapping; pending/executing do not.
        await publish_all(
            bus,
            [
                ev("d-1", "detach", "executing", 20, volume_id="vol-local"),
                ev("x-1", "delete", "completed", 21, volume_id="vol-r1"),
            ],
        )
        await wait_for(lambda: rows.op("x-1"))
        await wait_for(lambda: _gone(rows, "vol-r1"))
        assert await rows.mapping("vol-local") is not None
        await publish_all(bus, [ev("d-1", "detach", "completed", 22, volume_id="vol-local")])
        await wait_for(lambda: _gone(rows, "vol-local"))
        assert await rows.mapping("vol-r2") is not None

        # Out of order: a detach that completed after the attach arrives first.
        await publish_all(
            bus,
            [
                ev("d-2", "detach", "completed", 40, volume_id="vol-late"),
                ev("a-2", "attach", "completed", 30, volume_id="vol-late", vm_id="vm-far"),
                ev("marker", "create", "pending", 41),
            ],
        )
        await wait_for(lambda: rows.op("marker"))
        assert await rows.mapping("vol-late") is None

        # A device taken over by another volume (its detach not recorded yet) moves.
        await publish_all(
            bus,
            [
                ev(
                    "a-3",
                    "attach",
                    "completed",
                    50,
                    volume_id="vol-a",
                    vm_id="vm-here",
                    device_path="/dev/vdc",
                ),
                ev(
                    "a-4",
                    "attach",
                    "completed",
                    51,
                    volume_id="vol-b",
                    vm_id="vm-here",
                    device_path="/dev/vdc",
                ),
            ],
        )
        await wait_for(lambda: rows.mapping("vol-b"))
        assert await rows.mapping("vol-a") is None


async def _gone(rows: Rows, volume_id: str) -> bool:
    return await rows.mapping(volume_id) is None


async def test_undecodable_event_is_dead_lettered_and_processing_goes_on(
    bus: Bus, database: Database
) -> None:
    rows = Rows(database.dsn, database)
    async with running(bus, database.dsn):
        await bus.publish(event_subject("bad-1"), b"{not json")
        await bus.publish(
            event_subject("bad-2"),
            {"operation_id": "bad-2", "type": "snapshot", "status": "pending", "at": at(0)},
        )
        await bus.publish(event_subject("bad-3"), ev("other", "create", "pending", 0))
        await publish_all(bus, [ev("good", "create", "pending", 1)])
        await wait_for(lambda: rows.op("good"))

        async def dead() -> int:
            return int((await bus.js.stream_info(DEAD_LETTERS.name)).state.messages)

        assert await wait_for(lambda: _eq(dead(), 3))
        msg = await bus.js.get_msg(DEAD_LETTERS.name, seq=2)
        assert "type" in (msg.headers or {}).get("Volumed-Reason", "")
        assert await rows.op("bad-2") is None and await rows.op("other") is None


async def _eq(aw: Any, value: Any) -> bool:
    return bool(await aw == value)


# -- queries --------------------------------------------------------------------------------


async def test_queries(bus: Bus, backend: tuple[str, Database | None]) -> None:
    dsn, database = backend
    rows = Rows(dsn, database)
    async with running(bus, dsn):
        await publish_all(
            bus,
            [
                ev("q-1", "create", "pending", 0, request={"name": "a"}),
                ev("q-1", "create", "completed", 1, volume_id="vol-q", response={"ok": True}),
                ev("q-2", "attach", "pending", 2, volume_id="vol-q", vm_id="vm-1"),
                ev(
                    "q-2",
                    "attach",
                    "completed",
                    3,
                    volume_id="vol-q",
                    vm_id="vm-1",
                    device_path="/dev/vdq",
                    size=7,
                ),
                ev(
                    "q-3",
                    "detach",
                    "failed",
                    4,
                    volume_id="vol-other",
                    error=ErrorInfo(code="conflict", message="busy"),
                ),
            ],
        )
        await wait_for(lambda: _status(rows, "q-2", "completed"))
        await wait_for(lambda: rows.op("q-3"))

        op = await request(bus, "operation", {"operation_id": "q-1"})
        assert op["operation_id"] == "q-1" and op["status"] == "completed"
        assert op["request"] == {"name": "a"} and op["response"] == {"ok": True}
        assert op["volume_id"] == "vol-q" and op["error"] is None
        assert op["at"] == at(1) and op["created_at"] == at(0) and op["completed_at"] == at(1)
        assert op["updated_at"].endswith("Z")
        for key in ("vm_id", "device_path", "by_id_path", "type"):
            assert key in op
        failed = await request(bus, "operation", {"operation_id": "q-3"})
        assert failed["error"] == {"code": "conflict", "message": "busy"}

        everything = await request(bus, "operations", {})
        assert [o["operation_id"] for o in everything["operations"]] == ["q-3", "q-2", "q-1"]
        only = await request(bus, "operations", {"volume_id": "vol-q", "type": "attach"})
        assert [o["operation_id"] for o in only["operations"]] == ["q-2"]
        assert [
            o["operation_id"]
            for o in (await request(bus, "operations", {"status": "failed"}))["operations"]
        ] == ["q-3"]
        assert len((await request(bus, "operations", {"limit": 2}))["operations"]) == 2
        assert (await request(bus, "operations", {"vm_id": "vm-none"}))["operations"] == []

        mapping = await request(bus, "mapping", {"volume_id": "vol-q"})
        assert mapping["device_path"] == "/dev/vdq" and mapping["vm_id"] == "vm-1"
        assert mapping["size"] == 7 and mapping["last_sync"].endswith("Z")
        assert await request(bus, "mapping", {"device_path": "/dev/vdq"}) == mapping
        assert (await request(bus, "vm_volumes", {"vm_id": "vm-1"}))["volumes"] == [mapping]
        assert await request(bus, "vm_volumes", {"vm_id": "vm-empty"}) == {"volumes": []}

        # Another host's VM has its own /dev/vdq (a device path is unique per VM only).
        await publish_all(
            bus,
            [
                ev(
                    "q-4",
                    "attach",
                    "completed",
                    5,
                    volume_id="vol-r",
                    vm_id="vm-2",
                    device_path="/dev/vdq",
                    seq=4,
                )
            ],
        )
        await wait_for(lambda: rows.mapping("vol-r"))
        assert (await request(bus, "mapping", {"volume_id": "vol-q"}))["device_path"] == "/dev/vdq"
        code, text = await error_code(bus, "mapping", b'{"device_path": "/dev/vdq"}')
        assert code == "400" and "give vm_id" in text
        both = {"device_path": "/dev/vdq", "vm_id": "vm-1"}
        assert await request(bus, "mapping", both) == mapping
        assert (await request(bus, "mapping", {**both, "vm_id": "vm-2"}))["volume_id"] == "vol-r"

        # 404 for unknown ids, 400 with the field and the reason for bad requests.
        code, text = await error_code(bus, "operation", b'{"operation_id": "nope"}')
        assert code == "404" and "nope" in text
        assert (await error_code(bus, "mapping", b'{"volume_id": "vol-none"}'))[0] == "404"
        assert (await error_code(bus, "mapping", b'{"device_path": "/dev/none"}'))[0] == "404"
        for endpoint, body, words in [
            ("operation", b"{bad", "not valid JSON"),
            ("operation", b"", "empty"),
            ("operation", b'{"operation_id": "a b"}', "operation_id"),
            ("operation", b'{"operation_id": "x", "extra": 1}', "extra: unknown field"),
            ("operations", b'{"limit": 0}', "limit"),
            ("operations", b'{"limit": 1001}', "limit"),
            ("operations", b'{"status": "done"}', "status"),
            ("mapping", b"{}", "exactly one"),
            ("mapping", b'{"volume_id": "v", "device_path": "/dev/vdb"}', "exactly one"),
            ("vm_volumes", b"{}", "vm_id: this field is required"),
            ("health", b"{bad", "not valid JSON"),
        ]:
            code, text = await error_code(bus, endpoint, body)
            assert code == "400" and words in text, (endpoint, body, code, text)

        # Discoverable as a NATS micro service.
        ping = json.loads((await bus.nc.request("$SRV.PING.volumed", b"", timeout=2)).data)
        assert ping["name"] == "volumed" and ping["version"] == "0.1.0"
        info = json.loads((await bus.nc.request("$SRV.INFO.volumed", b"", timeout=2)).data)
        assert {e["subject"] for e in info["endpoints"]} == {
            f"volume.api.{n}"
            for n in ("operation", "operations", "mapping", "vm_volumes", "health")
        }


# -- health ---------------------------------------------------------------------------------


async def put_heartbeat(bus: Bus, actor: str, check: str, age: float = 0.0) -> None:
    bucket = await bus.bucket(HEALTH_BUCKET, Heartbeat)
    beat = Heartbeat(
        actor=actor,
        instance=f"{actor}-1",
        at=time.time() - age,
        checks={check: CheckResult(status="ok", detail=f"{check} fine")},
    )
    await bucket.put(f"{actor}.{actor}-1", beat)


async def test_health_reads_heartbeats_and_checks_the_database(
    bus: Bus, database: Database
) -> None:
    store = await open_store(database.dsn)
    try:
        async with running(bus, database.dsn, store=store):
            health = await request(bus, "health", {})
            assert health["status"] == "degraded"
            assert set(health["checks"]) >= {"nats", "database", "cloudstack", "device_watcher"}
            assert health["checks"]["nats"]["status"] == "ok"
            assert health["checks"]["database"]["status"] == "ok"
            assert "ms" in health["checks"]["database"]["detail"]
            assert health["checks"]["cloudstack"]["status"] == "down"
            assert "no executor heartbeat" in health["checks"]["cloudstack"]["detail"]
            assert "no watcher heartbeat" in health["checks"]["device_watcher"]["detail"]

            await put_heartbeat(bus, "executor", "cloudstack")
            await put_heartbeat(bus, "watcher", "device_watcher", age=60)
            health = await request(bus, "health", b"")
            assert health["checks"]["cloudstack"] == {
                "status": "ok",
                "detail": "executor-1: ok cloudstack fine",
            }
            assert health["checks"]["device_watcher"]["status"] == "down"
            assert "60 s old" in health["checks"]["device_watcher"]["detail"]
            assert health["status"] == "degraded"

            await put_heartbeat(bus, "watcher", "device_watcher")
            health = await request(bus, "health", {})
            assert health["status"] == "degraded"
            assert "no correlator heartbeat" in health["checks"]["correlator"]["detail"]
            await put_heartbeat(bus, "correlator", "correlator")
            health = await request(bus, "health", {})
            assert health["status"] == "ok", health

            await store.close()
            health = await request(bus, "health", {})
            assert health["status"] == "down"
            assert health["checks"]["database"]["status"] == "down"
            assert "closed" in health["checks"]["database"]["detail"]
    finally:
        await store.close()


async def test_unreachable_database_is_down_and_credentials_say_why(bus: Bus) -> None:
    dsn = f"mysql://root:s3cret-pw@127.0.0.1:{free_port()}/volumed"
    async with running(bus, dsn, wait_consuming=False) as actor:
        health = await request(bus, "health", {})
        assert health["status"] == "down"
        check = health["checks"]["database"]
        assert check["status"] == "down" and "127.0.0.1" in check["detail"]
        assert "s3cret-pw" not in json.dumps(health)
        creds = CloudStackCredentials(**json.loads(await bus.request(CONFIG_SUBJECT, {})))
        assert creds.error and "database" in creds.error and "s3cret-pw" not in creds.error
        # Which creates are in doubt cannot be told: the asker adopts nothing.
        doubt = msgspec.json.decode(
            await bus.request(CREATES_SUBJECT, _twin("c-me")), type=CreatesInDoubt
        )
        assert doubt.error and doubt.operations == [] and "s3cret-pw" not in doubt.error
        assert actor.store is None


def _twin(op: str, size: int = GIB) -> CreatesQuery:
    return CreatesQuery(
        operation_id=op, name="twin", size=size, zone_id="zone-1", disk_offering_id="off-1"
    )


async def test_creates_in_doubt_from_the_events_before_the_query(
    bus: Bus, backend: tuple[str, Database | None]
) -> None:
    """The creates of the asker's parameters that may have made a volume: not ended, or
    failed without naming one; asked at once after the events were published (the query
    waits until the database holds them)."""
    dsn, _ = backend
    twin = {"name": "twin", "size": GIB, "zone_id": "zone-1", "disk_offering_id": "off-1"}
    other = twin | {"size": 2 * GIB}
    async with running(bus, dsn):
        await publish_all(
            bus,
            [
                ev("c-pending", "create", "pending", 0, request=twin),
                ev("c-running", "create", "pending", 1, request=twin),
                ev("c-running", "create", "executing", 2),
                ev("c-done", "create", "pending", 3, request=twin),
                ev("c-done", "create", "completed", 4, volume_id="vol-done"),
                ev("c-lost", "create", "pending", 5, request=twin),
                ev("c-lost", "create", "failed", 6, error=ErrorInfo(code="internal", message="x")),
                ev("c-made", "create", "pending", 7, request=twin),
                ev("c-made", "create", "failed", 8, volume_id="vol-made"),
                ev("c-cancelled", "create", "pending", 9, request=twin),
                ev("c-cancelled", "create", "cancelled", 10),
                ev("c-other", "create", "pending", 11, request=other),
                ev("c-other", "create", "executing", 12),
                ev("c-me", "create", "pending", 13, request=twin),
                ev("c-me", "create", "executing", 14),
                ev("a-1", "attach", "executing", 15, volume_id="vol-done", vm_id="vm-1"),
            ],
        )
        doubt = msgspec.json.decode(
            await bus.request(CREATES_SUBJECT, _twin("c-me")), type=CreatesInDoubt
        )
        assert doubt == CreatesInDoubt(operations=["c-lost", "c-pending", "c-running"])
        doubt = msgspec.json.decode(
            await bus.request(CREATES_SUBJECT, _twin("c-me", 2 * GIB)), type=CreatesInDoubt
        )
        assert doubt == CreatesInDoubt(operations=["c-other"])


# -- CloudStack credentials -----------------------------------------------------------------


async def test_credentials_from_ossea_configs(bus: Bus, database: Database) -> None:
    async def creds() -> CloudStackCredentials:
        return CloudStackCredentials(**json.loads(await bus.request(CONFIG_SUBJECT, {})))

    async with running(bus, database.dsn):
        missing = await creds()
        assert (
            missing.error and "ossea_configs" in missing.error and "does not exist" in missing.error
        )
        await database.query(
            "CREATE TABLE ossea_configs (id INT AUTO_INCREMENT PRIMARY KEY, api_url VARCHAR(255),"
            " api_key VARCHAR(255), secret_key VARCHAR(255), oma_vm_id VARCHAR(64),"
            " is_active TINYINT NOT NULL DEFAULT 0)"
        )
        none_active = await creds()
        assert none_active.error and "no active row" in none_active.error
        await database.query(
            "INSERT INTO ossea_configs (api_url, api_key, secret_key, oma_vm_id, is_active)"
            " VALUES ('http://cs-a/client/api', 'key-a', 'secret-a', 'vm-a', 1),"
            " ('http://cs-b/client/api', 'key-b', 'secret-b', 'vm-b', 0)"
        )
        got = await creds()
        assert (got.endpoint, got.key, got.secret, got.vm_id, got.error) == (
            "http://cs-a/client/api",
            "key-a",
            "secret-a",
            "vm-a",
            None,
        )
        # Read fresh on every request: switching the active row takes effect at once.
        await database.query("UPDATE ossea_configs SET is_active = 1 - is_active")
        assert (await creds()).endpoint == "http://cs-b/client/api"


# -- outages and throughput -----------------------------------------------------------------


class Proxy:
    """A TCP proxy to MariaDB that a test can cut and restore: a real outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(MARIADB_HOST, MARIADB_PORT)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_database_outage_delays_events_then_applies_them(
    bus: Bus, database: Database
) -> None:
    proxy = Proxy()
    await proxy.start()
    dsn = f"mysql://root@127.0.0.1:{proxy.port}/{database.name}"
    rows = Rows(dsn, database)
    try:
        async with running(bus, dsn) as actor:
            await publish_all(bus, [ev("before", "create", "pending", 0)])
            await wait_for(lambda: rows.op("before"))
            await proxy.stop()
            await publish_all(bus, [ev(f"during-{i}", "create", "pending", i) for i in range(20)])
            assert actor.store is not None
            with pytest.raises(StoreUnavailable):
                await actor.store.ping()
            await asyncio.sleep(1.0)
            await proxy.start()
            await wait_for(lambda: _eq(_count(rows, "id LIKE 'during-%'"), 20), timeout=10)
            health = await request(bus, "health", {})
            assert health["checks"]["database"]["status"] == "ok"
    finally:
        await proxy.stop()


async def _count(rows: Rows, where: str) -> int:
    return int((await rows(f"SELECT COUNT(*) AS n FROM volume_operations WHERE {where}"))[0]["n"])


async def test_a_thousand_events_are_applied_in_batches(bus: Bus, database: Database) -> None:
    rows = Rows(database.dsn, database)
    async with running(bus, database.dsn) as actor:
        events = [
            ev(f"t-{i}", "attach", status, i + step, volume_id=f"v-{i}", vm_id="vm-t", size=1)
            for i in range(250)
            for step, status in enumerate(("pending", "executing", "completed"))
        ] + [ev(f"u-{i}", "detach", "completed", 1000 + i, volume_id=f"v-{i}") for i in range(250)]
        start = time.monotonic()
        # Publish concurrently, as many executors would.
        for chunk in range(0, len(events), 100):
            await asyncio.gather(
                *(
                    bus.publish(event_subject(e.operation_id), e)
                    for e in events[chunk : chunk + 100]
                )
            )
        await wait_for(lambda: _eq(_count(rows, "status = 'completed'"), 500), timeout=20)
        elapsed = time.monotonic() - start
        assert elapsed < 10, f"1000 events took {elapsed:.1f} s"
        assert actor.batcher is not None and actor.batcher.batches < 500
        assert await rows("SELECT * FROM device_mappings") == []


async def test_stopping_commits_in_flight_batches_and_loses_nothing(
    bus: Bus, database: Database
) -> None:
    rows = Rows(database.dsn, database)
    actor = PersistenceActor(bus, Settings(db_dsn=database.dsn), instance="first")
    task = asyncio.create_task(actor.run())
    await wait_for(lambda: actor.batcher is not None)
    await asyncio.gather(
        *(
            bus.publish(event_subject(f"s-{i}"), ev(f"s-{i}", "create", "pending", i))
            for i in range(300)
        )
    )
    await wait_for(lambda: actor.batcher is not None and actor.batcher.applied > 0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    assert actor.batcher is not None
    applied = actor.batcher.applied
    # Everything the actor acknowledged is committed, and every event it did not finish
    # is still waiting in JetStream (delivered-unacknowledged ones come back after
    # ack_wait), so nothing is lost.
    assert await _count(rows, "id LIKE 's-%'") == applied

    async def waiting() -> int:
        info = await bus.js.consumer_info(PERSISTENCE.stream, PERSISTENCE.durable)
        return int(info.num_pending + info.num_ack_pending)

    assert await wait_for(lambda: _eq(waiting(), 300 - applied))

    # A new actor takes the rest of the stream; stop() ends run() normally.
    await bus.publish(event_subject("after"), ev("after", "create", "pending", 0))
    second = PersistenceActor(bus, Settings(db_dsn=database.dsn), instance="second")
    task = asyncio.create_task(second.run())
    await wait_for(lambda: rows.op("after"))
    second.stop()
    await asyncio.wait_for(task, 15)


# -- schema ---------------------------------------------------------------------------------


async def test_deploy_sql_matches_what_the_code_creates(database: Database) -> None:
    store = await open_store(database.dsn)
    await store.close()
    by_hand = f"volumed_test_{uuid.uuid4().hex[:12]}"
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    sql = (Path(__file__).parent.parent / "deploy" / "schema.mysql.sql").read_text()
    try:
        async with conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(f"CREATE DATABASE `{by_hand}`")
            await cur.execute(f"USE `{by_hand}`")
            code = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
            for statement in code.split(";"):
                if statement.strip():
                    await cur.execute(statement)

            async def describe(schema: str) -> tuple[list[Any], list[Any]]:
                await cur.execute(
                    "SELECT TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, COLUMN_TYPE, IS_NULLABLE,"
                    " COLUMN_DEFAULT, EXTRA, COLLATION_NAME FROM information_schema.COLUMNS"
                    " WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, ORDINAL_POSITION",
                    (schema,),
                )
                columns = [tuple(r.values()) for r in await cur.fetchall()]
                await cur.execute(
                    "SELECT TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME, NON_UNIQUE"
                    " FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s"
                    " ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
                    (schema,),
                )
                return columns, [tuple(r.values()) for r in await cur.fetchall()]

            by_code = await describe(database.name)
            assert by_code == await describe(by_hand)
            tables = {c[0] for c in by_code[0]}
            assert tables == {"volume_operations", "device_mappings", "volume_heads"}
            unique = {(i[1], i[3]) for i in by_code[1] if i[0] == "device_mappings" and not i[4]}
            assert {("uq_device_mappings_volume_id", "volume_id")} <= unique
            # Unique per VM, never across VMs (contract §5).
            assert {
                ("uq_device_mappings_vm_device_path", "vm_id"),
                ("uq_device_mappings_vm_device_path", "device_path"),
            } <= unique
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{by_hand}`")
        conn.close()


async def test_open_store_never_shows_the_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await open_store(f"mysql://root:hunter2-pw@127.0.0.1:{free_port()}/volumed")
    assert "hunter2-pw" not in str(caught.value) and "***" in str(caught.value)


async def test_a_transaction_begins_with_its_first_statement_and_stays_whole(
    backend: tuple[str, Database | None],
) -> None:
    """BEGIN goes with a transaction's first statement, writes whose answer nobody reads
    with the next statement or the commit (MariaDB: in its round trip; SQLite: in its turn
    on the thread): from the first statement on the transaction is open, a later statement
    sees the writes before it, a statement refused later (at the commit too) takes the
    first one's row back, one refused first leaves nothing open."""
    dsn, _ = backend
    db = await open_backend(dsn)
    sql = db.dialect.sql
    insert = sql("INSERT INTO volume_heads (volume_id, seq) VALUES (?, ?)")
    heads = sql("SELECT volume_id FROM volume_heads WHERE volume_id LIKE ? ORDER BY volume_id")
    try:
        with pytest.raises(StoreRefused):
            async with db.transaction() as tx:
                assert await tx.execute(insert, ("t-1", 1)) == 1
                if db.dialect.name == "mysql":
                    assert await tx.fetch("SELECT @@in_transaction AS t") == [{"t": 1}]
                else:  # another writer waits for this one's lock
                    other = sqlite3.connect(dsn.removeprefix("sqlite://"), timeout=0)
                    with pytest.raises(sqlite3.OperationalError, match="locked"):
                        other.execute("BEGIN IMMEDIATE")
                    other.close()
                await tx.execute("INSERT INTO no_such_table VALUES (1)")
        with pytest.raises(StoreRefused):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO no_such_table VALUES (1)")
        with pytest.raises(StoreRefused):
            async with db.transaction() as tx:
                await tx.write(insert, ("t-1", 1))
                await tx.write("INSERT INTO no_such_table VALUES (1)")
        async with db.transaction() as tx:
            await tx.write(insert, ("t-2", 1))
            await tx.executemany(insert, [("t-3", 1)])
            assert len(await tx.fetch(heads, ("t-%",))) == 2
            await tx.executemany(insert, [("t-4", 1), ("t-5", 1)])
            await tx.write(
                sql("DELETE FROM volume_heads WHERE volume_id IN (?, ?)"), ("t-4", "t-5")
            )
        async with db.transaction() as tx:
            assert await tx.fetch(sql(f"{heads}{db.dialect.for_update}"), ("t-%",)) == [
                {"volume_id": "t-2"},
                {"volume_id": "t-3"},
            ]
        async with db.connection() as conn:
            assert len(await conn.fetch(heads, ("t-%",))) == 2
    finally:
        await db.close()


# -- the merge, for any order of events -----------------------------------------------------


def _event(op_type: str, status: str, t: float, **fields: Any) -> Event:
    raw = ev("m", op_type, status, t, **fields)
    return Event(raw=raw, at=parse_time(raw.at))


LIFECYCLE = [
    _event("create", "pending", 0, request={"n": 1}),
    _event("create", "executing", 1),
    _event("create", "completed", 2, volume_id="v", response={"id": "v"}),
]


@given(
    st.lists(st.sampled_from(range(3)), min_size=3, max_size=8).filter(
        lambda xs: set(xs) == {0, 1, 2}
    )
)
def test_merge_reaches_the_same_row_in_any_order(order: list[int]) -> None:
    now = dt.datetime(2031, 1, 1)
    row: OperationRow | None = None
    for i in order:
        row = merge(row, LIFECYCLE[i], now) or row
    assert row is not None
    assert (row.status, row.volume_id, row.request, row.response) == (
        "completed",
        "v",
        '{"n":1}',
        '{"id":"v"}',
    )
    assert row.created_at == LIFECYCLE[0].at and row.completed_at == LIFECYCLE[2].at
