"""Taking over a site from the Go daemon (issue 14, contract §5): its tables, both
generations, with rows in them, on the real MariaDB; docs/migrating.md walks it through."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import aiomysql
import pytest

from actors.persistence.backends import missing_columns
from actors.persistence.errors import StoreRefused
from actors.persistence.records import decode_event
from actors.persistence.schema import MYSQL
from actors.persistence.store import open_store
from actors.persistence.takeover import GoTablesFound, migrate
from schemas.common import GIB
from simulator import Simulator
from tests.conftest import MARIADB_HOST, MARIADB_PORT, Database, NatsServer, stop_volumed, wait_for
from tests.test_cli import volumed_cli
from tests.test_devices_e2e import fake_tree, hotplugging, start
from tests.test_lifecycle import create_body, op

# The Go daemon's DDL (its database/schema.sql, then its later migrations), as it made them.
GO_OPERATIONS = """
CREATE TABLE volume_operations (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  type ENUM('create', 'attach', 'detach', 'delete') NOT NULL,
  status ENUM('pending', 'executing', 'completed', 'failed', 'cancelled')
    NOT NULL DEFAULT 'pending',
  volume_id VARCHAR(64) NOT NULL,
  vm_id VARCHAR(64) NULL,
  request JSON NOT NULL,
  response JSON NULL,
  error TEXT NULL,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  completed_at TIMESTAMP NULL,
  INDEX idx_volume_operations_volume_id (volume_id),
  INDEX idx_volume_operations_status (status),
  INDEX idx_volume_operations_created_at (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
GO_HISTORY = """
CREATE TABLE volume_operation_history (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  operation_id VARCHAR(64) NOT NULL,
  status VARCHAR(32) NOT NULL,
  details JSON NULL,
  timestamp TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  FOREIGN KEY (operation_id) REFERENCES volume_operations(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
GO_MAPPINGS_FIRST = """
CREATE TABLE device_mappings (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  volume_id VARCHAR(64) NOT NULL,
  vm_id VARCHAR(64) NOT NULL,
  device_path VARCHAR(32) NOT NULL,
  cloudstack_state VARCHAR(32) NOT NULL,
  linux_state VARCHAR(32) NOT NULL,
  size BIGINT NOT NULL,
  last_sync TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  UNIQUE KEY unique_volume_id (volume_id),
  UNIQUE KEY unique_device_path (device_path),
  INDEX idx_device_mappings_vm_id (vm_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
GO_MAPPINGS_LATER = """
CREATE TABLE device_mappings (
  id VARCHAR(64) NOT NULL PRIMARY KEY,
  volume_uuid VARCHAR(64) NOT NULL,
  volume_id_numeric BIGINT NULL,
  vm_id VARCHAR(64) NOT NULL,
  vm_context_id VARCHAR(64) NULL,
  operation_mode ENUM('oma', 'failover') NOT NULL DEFAULT 'oma',
  device_path VARCHAR(255) NULL,
  cloudstack_device_id INT NULL,
  requires_device_correlation BOOLEAN NOT NULL DEFAULT TRUE,
  cloudstack_state VARCHAR(32) NOT NULL,
  linux_state VARCHAR(32) NOT NULL,
  size BIGINT NOT NULL,
  ossea_snapshot_id VARCHAR(64) NULL,
  snapshot_created_at TIMESTAMP NULL,
  snapshot_status ENUM('none', 'creating', 'ready', 'failed') NOT NULL DEFAULT 'none',
  persistent_device_name VARCHAR(255) NULL,
  symlink_path VARCHAR(255) NULL,
  last_sync TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  UNIQUE KEY unique_volume_uuid (volume_uuid),
  UNIQUE KEY unique_device_path (device_path),
  INDEX idx_device_mappings_vm_id (vm_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
GO_EXPORTS = """
CREATE TABLE nbd_exports (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  volume_uuid VARCHAR(64) NOT NULL,
  export_name VARCHAR(255) NOT NULL,
  FOREIGN KEY (volume_uuid) REFERENCES device_mappings(volume_uuid) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

OMA_VM = "0d1e2f30-aaaa-4bbb-8ccc-000000000001"
FAILOVER_VM = "0d1e2f30-aaaa-4bbb-8ccc-000000000002"


class GoSite:
    """A database the Go daemon used, with an attached volume (``attached``), one whose disk
    is gone (``gone``), and operations completed, failed, executing and pending."""

    def __init__(
        self, database: Database, generation: str, vm_id: str = OMA_VM, touched: bool = False
    ) -> None:
        self.db = database
        self.generation = generation
        self.touched = touched
        self.vm_id = vm_id
        self.attached = str(uuid.uuid4())
        self.gone = str(uuid.uuid4())
        self.detached = str(uuid.uuid4())
        self.failover = str(uuid.uuid4())

    async def build(self) -> None:
        conn = await aiomysql.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
        )
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"CREATE DATABASE `{self.db.name}`")
                await cur.execute(f"USE `{self.db.name}`")
                later = self.generation == "later"
                for ddl in (
                    GO_OPERATIONS,
                    GO_HISTORY,
                    GO_MAPPINGS_LATER if later else GO_MAPPINGS_FIRST,
                    *([GO_EXPORTS] if later else []),
                ):
                    await cur.execute(ddl)
                ops = [
                    ("op-create-1", "create", "completed", self.attached, None, {"name": "d1"},
                     {"volume_id": self.attached}, None),
                    ("op-attach-1", "attach", "completed", self.attached, self.vm_id,
                     {"vm_id": self.vm_id}, {"device_path": "/dev/vdc"}, None),
                    ("op-detach-2", "detach", "failed", self.gone, None, {}, None,
                     "CloudStack API error: volume is not attached"),
                    ("op-attach-3", "attach", "executing", self.gone, self.vm_id,
                     {"vm_id": self.vm_id}, None, None),
                    ("op-create-4", "create", "pending", "", None, {"name": "d4"}, None, None),
                ]  # fmt: skip
                for i, (oid, kind, status, vol, vm, req, resp, err) in enumerate(ops):
                    done = status in ("completed", "failed")
                    await cur.execute(
                        "INSERT INTO volume_operations (id, type, status, volume_id, vm_id, "
                        "request, response, error, created_at, updated_at, completed_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            oid, kind, status, vol, vm, json.dumps(req),
                            None if resp is None else json.dumps(resp), err,
                            f"2026-11-0{i + 1} 10:00:00", f"2026-11-0{i + 1} 10:00:05",
                            f"2026-11-0{i + 1} 10:00:05" if done else None,
                        ),
                    )  # fmt: skip
                await cur.execute(
                    "INSERT INTO volume_operation_history (operation_id, status) "
                    "VALUES ('op-attach-1', 'completed')"
                )
                column = "volume_uuid" if later else "volume_id"
                maps = [
                    (self.attached, self.vm_id, "/dev/vdc", "attached"),
                    (self.gone, self.vm_id, "/dev/vdd", "attached"),
                    (self.detached, self.vm_id, "/dev/vde", "detached"),
                ]
                if later:
                    maps.append((self.failover, FAILOVER_VM, None, "attached"))
                for i, (vol, vm, path, state) in enumerate(maps):
                    await cur.execute(
                        f"INSERT INTO device_mappings (id, {column}, vm_id, device_path, "
                        "cloudstack_state, linux_state, size, created_at) "
                        "VALUES (%s, %s, %s, %s, %s, 'detected', %s, '2026-11-02 10:00:05')",
                        (f"map-{i}", vol, vm, path, state, 5 * GIB),
                    )
                if later:
                    await cur.execute(
                        "UPDATE device_mappings SET operation_mode = 'failover' WHERE vm_id = %s",
                        (FAILOVER_VM,),
                    )
                    await cur.execute(
                        "INSERT INTO nbd_exports (volume_uuid, export_name) VALUES (%s, 'e1')",
                        (self.attached,),
                    )
                if self.touched:
                    await self._touch(cur)
        finally:
            conn.close()

    async def _touch(self, cur: aiomysql.Cursor) -> None:
        """What a volumed that did not recognise the Go tables did to them: its columns
        added, and the one operation whose events fitted the Go columns written."""
        await cur.execute(
            "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s",
            (self.db.name,),
        )
        for statement in missing_columns(MYSQL, set(await cur.fetchall())):
            await cur.execute(statement)
        await cur.execute(
            "INSERT INTO volume_operations (id, type, status, status_rank, volume_id, vm_id, "
            "request, event_at, created_at, updated_at) VALUES ('volumed-attach', 'attach', "
            "'executing', 1, %s, %s, '{}', '2026-12-01 10:00:01', '2026-12-01 10:00:00', "
            "'2026-12-01 10:00:01')",
            (self.gone, self.vm_id),
        )

    async def snapshot(self) -> dict[str, object]:
        """Every table's columns and rows: what must not change."""
        tables = [
            str(r["TABLE_NAME"])
            for r in await self.db.query(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
                "ORDER BY TABLE_NAME",
                self.db.name,
            )
        ]
        out: dict[str, object] = {}
        for t in tables:
            columns = await self.db.query(
                "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                self.db.name,
                t,
            )
            out[t] = (columns, await self.rows(t))
        return out

    async def rows(self, table: str) -> list[dict[str, object]]:
        return await self.db.query(f"SELECT * FROM `{table}` ORDER BY id")


async def dry_run(dsn: str, *, by_cli: bool) -> list[str]:
    """What `volumed migrate --dry-run` prints."""
    if not by_cli:
        said: list[str] = []
        assert await migrate(dsn, dry_run=True, out=said.append) == 0
        return said
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "migrate",
        "--dry-run",
        env={**os.environ, "VOLUMED_DB_DSN": dsn},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode().splitlines()


@pytest.fixture(params=["first", "later", "touched"])
async def site(request: pytest.FixtureRequest, database: Database) -> GoSite:
    """Each generation of the Go tables, and the first one after a volumed that did not
    recognise them had started on them (issue 14: it added its columns)."""
    touched = request.param == "touched"
    s = GoSite(database, "first" if touched else request.param, touched=touched)
    await s.build()
    return s


async def test_start_refuses_the_go_tables_and_changes_nothing(site: GoSite) -> None:
    before = await site.snapshot()
    with pytest.raises(GoTablesFound) as refused:
        store = await open_store(site.db.dsn)
        await store.close()  # (without the check: volumed opened them, altered)
    text = str(refused.value)
    assert "volume_operations" in text and "device_mappings" in text
    assert "`volumed migrate`" in text and "docs/migrating.md" in text
    assert "volume_id is NOT NULL" in text
    assert f"({site.generation} generation)" in text
    assert ("it has volume_uuid" in text) == (site.generation == "later")
    assert await site.snapshot() == before


async def test_migrate_keeps_every_row_and_answers_the_old_operations(site: GoSite) -> None:
    before = await site.snapshot()
    # --dry-run, as an operator runs it (once: a process costs seconds): the statements, and
    # nothing changed.
    printed = "\n".join(await dry_run(site.db.dsn, by_cli=site.generation == "later"))
    for statement in (
        "CREATE TABLE IF NOT EXISTS volume_operations_volumed_new",
        "INSERT INTO device_mappings_volumed_new",
        "RENAME TABLE volume_operations TO volume_operations_go_backup_",
        "-- dry run: nothing was changed",
    ):
        assert statement in printed
    assert await site.snapshot() == before

    said: list[str] = []
    assert await migrate(site.db.dsn, dry_run=False, out=said.append) == 0
    total = 6 if site.touched else 5
    assert f"-- volume_operations: {total} of {total} rows converted" in "\n".join(said)
    after = await site.snapshot()
    # The Go tables are kept whole, under their backup names.
    backups = {t: n for t in after for n in before if str(t).startswith(f"{n}_go_backup_")}
    assert sorted(backups.values()) == ["device_mappings", "volume_operations"]
    for backup, name in backups.items():
        assert after[backup] == before[name]
    # Tables volumed does not use are left as they were.
    for other in ("volume_operation_history", "nbd_exports"):
        if other in before:
            assert after[other][1] == before[other][1]  # type: ignore[index]
    kept = {str(r["id"]) for r in await site.rows("volume_operations")}
    assert kept == {str(r["id"]) for r in before["volume_operations"][1]}  # type: ignore[index]

    store = await open_store(site.db.dsn)
    try:
        attach = await store.operation("op-attach-1")
        assert attach is not None
        assert (attach.type, attach.status, attach.volume_id, attach.vm_id) == (
            "attach",
            "completed",
            site.attached,
            site.vm_id,
        )
        assert attach.created_at == "2026-11-02T10:00:00.000000Z"
        assert attach.completed_at == "2026-11-02T10:00:05.000000Z"
        assert attach.request == {"vm_id": site.vm_id}
        failed = await store.operation("op-detach-2")
        assert failed is not None and failed.status == "failed"
        assert failed.error == {
            "code": "internal",
            "message": "CloudStack API error: volume is not attached",
        }
        for unfinished in ("op-attach-3", "op-create-4"):
            row = await store.operation(unfinished)
            assert row is not None and row.status == "failed" and row.completed_at
            assert row.error is not None
            assert "the Go daemon was stopped while this operation was" in row.error["message"]
        pending = await store.operation("op-create-4")
        assert pending is not None and pending.volume_id is None
        if site.touched:
            # volumed's own row keeps its status: its later events are still to come.
            own = await store.operation("volumed-attach")
            assert own is not None and (own.status, own.error) == ("executing", None)
            assert own.at == "2026-12-01T10:00:01.000000Z"

        # Imported mappings name no device until a correlator proves one.
        mapping = await store.mapping_by_volume(site.attached)
        assert mapping is not None
        assert (mapping.vm_id, mapping.device_path, mapping.size) == (site.vm_id, None, 5 * GIB)
        assert mapping.proof == "none" and mapping.operation_id == "op-attach-1"
        assert mapping.proof_reason is not None
        assert "imported from the Go daemon, which named /dev/vdc" in mapping.proof_reason
        assert await store.mapping_by_volume(site.detached) is None
        imported = {m.volume_id for m in await store.vm_volumes(site.vm_id)}
        assert imported == {site.attached, site.gone}
        if site.generation == "later":
            other = await store.mapping_by_volume(site.failover)
            assert other is not None and other.vm_id == FAILOVER_VM

        # What failed before the takeover: an event without volume_id is written.
        event = {
            "operation_id": "new-create",
            "type": "create",
            "status": "pending",
            "volume_id": None,
            "vm_id": None,
            "device_path": None,
            "by_id_path": None,
            "error": None,
            "at": "2026-12-01T10:00:00Z",
        }
        raw = json.dumps(event).encode()
        await store.apply([decode_event("volume.events.new-create", raw)])
        assert (await store.operation("new-create")) is not None
    finally:
        await store.close()
    said.clear()
    assert await migrate(site.db.dsn, dry_run=True, out=said.append) == 0
    assert any("nothing to do" in line for line in said)


async def test_migrate_refuses_a_dsn_it_cannot_use() -> None:
    """Tried from outside: ``VOLUMED_DB_DSN=postgres://... volumed migrate`` said "nothing
    to do" and exited 0, as it does for SQLite (where no Go table can be)."""
    said: list[str] = []
    assert await migrate("sqlite:///nowhere/volumed.db", dry_run=True, out=said.append) == 0
    assert "nothing to do" in said[0]
    for dsn in ("postgres://u:secret@db/x", "mysq://root@127.0.0.1/x", "volumed"):
        with pytest.raises(StoreRefused, match="unsupported database") as refused:
            await migrate(dsn, dry_run=True, out=said.append)
        assert "secret" not in str(refused.value)


async def test_the_daemon_waits_for_the_takeover_then_reproves_the_mappings(
    nats_server: NatsServer, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=5, serials=True)) as sim:
        site = GoSite(database, "later", vm_id=str(sim.local_vm_id))
        await site.build()
        # The disk the Go daemon attached is there, under another name than it recorded.
        sim.hotplug.plug(site.attached, 5 * GIB)
        await wait_for(lambda: (dev / "vdb").exists())

        v = await start(nats_server, database, sim, sysfs, dev)
        try:

            async def refused() -> dict[str, object] | None:
                health, _ = await v.query("health", {})  # (waits for the service)
                check = health["checks"]["database"]  # type: ignore[index]
                return health if "volume_operations" in check["detail"] else None

            health = await wait_for(refused)
            assert health["status"] == "down"
            detail = health["checks"]["database"]["detail"]  # type: ignore[index]
            assert "`volumed migrate`" in detail and "later generation" in detail
            # Tried from outside: the log said "retrying every 0 s", and a query answered
            # 500 "internal error" with a traceback logged for each one.
            assert "retrying, at most every 10 s" in caplog.text
            waiting, code = await v.query("operation", {"operation_id": "op-attach-3"})
            assert code == "503", (code, waiting)
            ran = await volumed_cli(nats_server, "status", "op-attach-3", timeout=30)
            assert ran.code == 3 and "unavailable: " in ran.err, ran
            assert not any(r.exc_info for r in caplog.records if r.name == "volumed.bus.service")

            # Commands still run; their events wait in the stream for the database.
            create = op()
            await v.send("create", create_body(sim, create, "after-switch"))
            assert (await v.terminal(create))["status"] == "completed"

            assert await migrate(database.dsn, dry_run=False, out=lambda _: None) == 0

            row = await v.row(database, create, "completed", timeout=30)
            assert row["volume_id"]

            async def proven() -> dict[str, object] | None:
                rows = await database.query(
                    "SELECT * FROM device_mappings WHERE volume_id = %s", site.attached
                )
                return rows[0] if rows and rows[0]["proof"] == "serial" else None

            mapping = await wait_for(proven, 20)
            assert mapping["device_path"] == str(dev / "vdb")
            gone, _ = await v.query("mapping", {"volume_id": site.gone})
            assert gone["device_path"] is None and gone["proof"] == "none"
            assert gone["proof_reason"]

            old, code = await v.query("operation", {"operation_id": "op-attach-3"})
            assert code is None and old["status"] == "failed"
            listed, _ = await v.query("operations", {"volume_id": site.attached})
            assert [o["operation_id"] for o in listed["operations"]] == [  # type: ignore[union-attr]
                "op-attach-1",
                "op-create-1",
            ]
            health, _ = await v.query("health", {})
            assert health["checks"]["database"]["status"] == "ok"  # type: ignore[index]
            counts = await database.query(
                "SELECT (SELECT COUNT(*) FROM volume_operations) AS ops, "
                "(SELECT COUNT(*) FROM device_mappings) AS maps"
            )
            assert counts == [{"ops": 6, "maps": 3}]  # the detached row stays in the backup
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]
