"""A database that refuses writes: events wait (never dead-lettered), health names the cause
within seconds, and the rows catch up once it is fixed. Real MariaDB users and tables, a real
SQLite file, a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
import pytest
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError

from actors.heartbeat import beat
from actors.persistence import open_store
from actors.persistence.backends import SQLiteBackend, _MySQLErrors
from actors.persistence.errors import StoreUnavailable
from actors.persistence.schema import SQLITE
from bus import Bus
from bus.topology import DEAD_LETTERS, EVENTS, OPERATIONS_BUCKET, PERSISTENCE, TOPOLOGY
from schemas.internal import CheckResult
from tests.conftest import MARIADB_HOST, MARIADB_PORT, Database, NatsServer, wait_for
from tests.test_persistence import Rows, ev, publish_all, request, running


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "test")
    await b.provision(TOPOLOGY)
    yield b
    await b.close()


async def root(sql: str) -> None:
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
async def reader(database: Database) -> AsyncIterator[tuple[str, str]]:
    """A MariaDB user that may only SELECT in ``database`` (tables made first): its name
    and password, random; dropped afterwards."""
    store = await open_store(database.dsn)  # the tables, as volumed creates them
    await store.close()
    name, password = f"ro_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    await root(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'")
    try:
        await root(f"GRANT SELECT ON `{database.name}`.* TO '{name}'@'%'")
        yield name, password
    finally:
        await root(f"DROP USER IF EXISTS '{name}'@'%'")


def five_operations() -> list[Any]:
    """Five operations: creates, and an attach whose mapping row must appear too."""
    events = []
    for i in range(4):
        events += [
            ev(f"op-{i}", "create", "pending", i),
            ev(f"op-{i}", "create", "completed", i + 0.5, volume_id=f"vol-{i}"),
        ]
    events.append(
        ev(
            "op-4",
            "attach",
            "completed",
            9,
            volume_id="vol-4",
            vm_id="vm-1",
            device_path="/dev/vdb",
            attached=True,
        )
    )
    return events


async def dead_letters(bus: Bus) -> int:
    return int((await bus.js.stream_info(DEAD_LETTERS.name)).state.messages)


async def database_check(bus: Bus) -> dict[str, str]:
    health = await request(bus, "health", {})
    check: dict[str, str] = health["checks"]["database"]
    return check


async def refused_then_fixed(
    bus: Bus,
    dsn: str,
    rows: Rows,
    cause: str,
    fix: Any,
    secret: str = "",
    *,
    then: Any = None,
    every_event: bool = True,
) -> None:
    """Events published while the database refuses (after ``then()``, once volumed runs):
    health names ``cause`` within seconds, nothing is dead-lettered, the consumer takes one
    message at a time; after ``fix()`` every row appears and health is ok again."""
    async with running(bus, dsn) as actor:
        if then is not None:
            await then()
        await publish_all(bus, five_operations())

        async def refused() -> dict[str, str] | None:
            check = await database_check(bus)
            return check if check["status"] != "ok" else None

        check = await wait_for(refused, timeout=10)
        assert check["status"] == "degraded", check
        assert cause in check["detail"], check
        if secret:
            assert secret not in check["detail"]
        assert actor.consumer is not None and actor.consumer.concurrency == 1
        info = await bus.js.consumer_info(EVENTS.name, PERSISTENCE.durable)
        if every_event:  # the refusal meets every event, not only those of one table
            assert info.num_ack_pending + info.num_pending == 9
            assert await rows("SELECT id FROM volume_operations") == []
        else:
            assert info.num_ack_pending + info.num_pending > 0
        assert await dead_letters(bus) == 0

        await fix()
        await wait_for(
            lambda: _count(rows, "SELECT id FROM volume_operations WHERE status = 'completed'", 5),
            timeout=20,
        )
        mapping = await wait_for(lambda: rows.mapping("vol-4"))
        assert mapping["device_path"] == "/dev/vdb"
        assert (await database_check(bus))["status"] == "ok"
        assert await dead_letters(bus) == 0
        assert actor.consumer.concurrency > 1
        # A handful of probes, not a pass over the backlog every pause.
        assert actor.gate.refusals < 60, actor.gate.refusals


async def _count(rows: Rows, sql: str, n: int) -> bool:
    return len(await rows(sql)) == n


async def test_a_user_that_may_only_select_waits_for_its_grant(
    bus: Bus, database: Database, reader: tuple[str, str]
) -> None:
    name, password = reader
    dsn = f"mysql://{name}:{password}@{MARIADB_HOST}:{MARIADB_PORT}/{database.name}"

    async def grant() -> None:
        await root(f"GRANT INSERT, UPDATE, DELETE ON `{database.name}`.* TO '{name}'@'%'")

    await refused_then_fixed(
        bus, dsn, Rows(database.dsn, database), "command denied to user", grant, secret=password
    )


async def test_a_not_null_column_volumed_does_not_fill_waits_for_a_default(
    bus: Bus, database: Database
) -> None:
    store = await open_store(database.dsn)
    await store.close()
    await database.query("ALTER TABLE volume_operations ADD COLUMN tenant VARCHAR(32) NOT NULL")

    async def fix() -> None:
        await database.query(
            "ALTER TABLE volume_operations MODIFY COLUMN tenant VARCHAR(32) NOT NULL DEFAULT ''"
        )

    await refused_then_fixed(
        bus, database.dsn, Rows(database.dsn, database), "doesn't have a default value", fix
    )


async def test_a_dropped_sqlite_table_waits_until_it_is_back(bus: Bus, tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    dsn = f"sqlite://{path}"
    db = sqlite3.connect(path)

    async def drop() -> None:  # volumed would make it again at its start
        db.execute("DROP TABLE device_mappings")
        db.commit()

    async def fix() -> None:
        for statement in SQLITE.ddl():  # what deploy/ would run by hand
            db.execute(statement)
        db.commit()

    try:
        await refused_then_fixed(
            bus,
            dsn,
            Rows(dsn, None),
            "no such table: device_mappings",
            fix,
            then=drop,
            every_event=False,
        )
    finally:
        db.close()


async def test_jetstream_refusing_to_store_is_named_in_health(bus: Bus, tmp_path: Path) -> None:
    dsn = f"sqlite://{tmp_path}/v.db"
    async with running(bus, dsn):
        await publish_all(bus, [ev("first", "create", "pending", 0)])
        config = (await bus.js.stream_info(EVENTS.name)).config
        full = (await bus.js.stream_info(EVENTS.name)).state.messages
        # The events stream at its limit, refusing new messages (as an account over its
        # storage or a full disk would).
        config.max_msgs, config.discard = full, DiscardPolicy.NEW
        await bus.js.update_stream(config)
        with pytest.raises(APIError):
            await publish_all(bus, [ev("second", "create", "pending", 1)])
        health = await request(bus, "health", {})
        nats = health["checks"]["nats"]
        assert nats["status"] == "degraded", nats
        assert "maximum messages exceeded" in nats["detail"], nats
        assert health["status"] != "ok"
        # Another process's publishes: its heartbeat carries the refusal.
        stop, now = asyncio.Event(), asyncio.Event()

        async def one_beat() -> dict[str, CheckResult]:
            stop.set()
            now.set()
            return {}

        await beat(bus, "executor", "other-host", 1.0, one_beat, now=now, stop=stop)
        jetstream = (await request(bus, "health", {}))["checks"]["jetstream"]
        assert jetstream["status"] == "degraded" and "other-host" in jetstream["detail"]
        assert "maximum messages exceeded" in jetstream["detail"]

        config.max_msgs, config.discard = -1, DiscardPolicy.OLD
        await bus.js.update_stream(config)
        await publish_all(bus, [ev("second", "create", "pending", 1)])
        health = await request(bus, "health", {})
        assert health["checks"]["nats"]["status"] == "ok", health

        # A bucket's writes (the executor's records) refused in the same way.
        records = await bus.bucket(OPERATIONS_BUCKET, CheckResult)
        await records.put("op-0", CheckResult(status="ok"))
        kv = (await bus.js.stream_info(f"KV_{OPERATIONS_BUCKET.name}")).config
        kv.max_msgs, kv.discard = 1, DiscardPolicy.NEW
        await bus.js.update_stream(kv)
        with pytest.raises(APIError):
            await records.put("op-1", CheckResult(status="ok"))
        nats = (await request(bus, "health", {}))["checks"]["nats"]
        assert nats["status"] == "degraded" and "$KV.volumed_operations.op-1" in nats["detail"]
        kv.max_msgs = -1
        await bus.js.update_stream(kv)
        await records.put("op-1", CheckResult(status="ok"))
        assert (await request(bus, "health", {}))["checks"]["nats"]["status"] == "ok"


# Every refusal the brief names, as the drivers raise it: each one makes events wait (a
# StoreUnavailable), none is taken for the event's own fault. The real ones above go through
# the same classification.
MYSQL_REFUSALS = {
    1142: "INSERT command denied to user 'ro'@'localhost' for table volume_operations",
    1044: "Access denied for user 'ro'@'%' to database 'volumed'",
    1045: "Access denied for user 'ro'@'localhost' (using password: YES)",
    1227: "Access denied; you need (at least one of) the SUPER privilege(s)",
    1290: "The MariaDB server is running with the --read-only option",
    1836: "Running in read-only mode",
    1364: "Field 'tenant' doesn't have a default value",
    1048: "Column 'tenant' cannot be null",
    1054: "Unknown column 'by_id_path' in 'field list'",
    1146: "Table 'volumed.device_mappings' doesn't exist",
    1205: "Lock wait timeout exceeded; try restarting transaction",
    1213: "Deadlock found when trying to get lock; try restarting transaction",
    1021: "Disk full (/var/lib/mysql); waiting for someone to free some space...",
    1114: "The table 'volume_operations' is full",
    1406: "Data too long for column 'volume_id' at row 1",
    4025: "CONSTRAINT `volume_operations.request` failed",
    2006: "MySQL server has gone away",
}
SQLITE_REFUSALS = (
    sqlite3.OperationalError("attempt to write a readonly database"),
    sqlite3.OperationalError("database or disk is full"),
    sqlite3.OperationalError("no such table: device_mappings"),
    sqlite3.OperationalError("table volume_operations has no column named by_id_path"),
    sqlite3.IntegrityError("NOT NULL constraint failed: volume_operations.tenant"),
    sqlite3.OperationalError("database is locked"),
)


async def test_every_database_refusal_makes_events_wait(tmp_path: Path) -> None:
    classify = _MySQLErrors("mysql://ro:***@db/volumed", ["secret"])
    for code, text in MYSQL_REFUSALS.items():
        kind = pymysql.err.OperationalError if code >= 2000 else pymysql.err.MySQLError
        error = classify(kind(code, text))
        assert isinstance(error, StoreUnavailable), (code, error)
        assert text in str(error) and f"error {code}" in str(error)
    sqlite = await SQLiteBackend.open(f"sqlite://{tmp_path}/c.db")
    try:
        for raised in SQLITE_REFUSALS:

            def fail(e: sqlite3.Error = raised) -> None:
                raise e

            with pytest.raises(StoreUnavailable, match=re.escape(str(raised))):
                await sqlite._run(fail)
    finally:
        await sqlite.close()


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of its own, that a test can make read-only or fill up (root only)."""
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_a_full_sqlite_disk_waits_for_room(bus: Bus, tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        dsn = f"sqlite://{fs}/v.db"
        filler = fs / "filler"

        async def fill() -> None:
            with contextlib.suppress(OSError), filler.open("wb") as f:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()

        async def free() -> None:
            filler.unlink()

        await refused_then_fixed(bus, dsn, Rows(dsn, None), "full", free, then=fill)
