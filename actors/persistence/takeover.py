"""Taking over the Go daemon's tables (contract §5, docs/migrating.md).

Sites switching from the Go volume daemon keep its MariaDB database, where
``volume_operations`` and ``device_mappings`` already exist with its shape: ENUM types,
``volume_id`` and ``request`` NOT NULL, ``device_path`` NOT NULL, a primary key without a
default, and (later generations) ``volume_uuid`` and many more columns. volumed cannot
write its rows there (every event would be refused), and it must not alter them under a
Go daemon that may still be running. So:

- at start, ``refuse_go_tables`` recognises them and refuses to open the store, naming the
  tables and the command to run; persistence keeps retrying, health says ``down`` with that
  text, and events wait in the stream (nothing is consumed, so nothing is dead-lettered);
- ``volumed migrate`` (``--dry-run`` prints the statements and changes nothing) builds
  volumed's tables from ``schema.TABLES`` beside the Go ones, copies every row across
  converted, and then swaps them in one ``RENAME TABLE``: the Go tables themselves, untouched,
  become ``<table>_go_backup_<date>``. Until that one atomic statement nothing the Go daemon
  reads has changed; after it, going back is the reverse rename (docs/migrating.md).

Imported mappings name no device: the Go daemon's ``device_path`` is a name the kernel may
have given another disk since, so each row keeps ``proof = 'none'`` and a reason until this
host's correlator proves it again (by serial, as for any mapping: its proof applies to rows
whose ``operation_id`` matches, and the imported row carries the one the query gives it).
The Go daemon's operations still ``pending`` or ``executing`` are marked ``failed``: nothing
will ever finish them, and their callers poll until a terminal status.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from actors.persistence.errors import StoreRefused
from actors.persistence.schema import DEVICE_MAPPINGS, MYSQL, TABLES, VOLUME_OPERATIONS, Table
from schemas.common import STATUS_RANK, TERMINAL
from schemas.config import mask_url_password

if TYPE_CHECKING:
    from actors.persistence.backends import Connection

log = logging.getLogger("volumed.persistence.takeover")

COMMAND = "volumed migrate"
NEW_SUFFIX = "_volumed_new"
BACKUP_INFIX = "_go_backup_"

# What the Go daemon's rows say about an operation whose status is not terminal: it stopped
# while the operation ran, and volumed has no command in its stream to finish it with.
STOPPED_MID_OPERATION = (
    "the Go daemon was stopped while this operation was {status}; volumed took over the "
    "database and did not run it: check the volume in CloudStack, then send the command again"
)
IMPORTED_REASON = (
    "imported from the Go daemon, which named {device}; not yet re-proven by a volumed "
    "correlator on this VM"
)


@dataclass(frozen=True)
class ColumnInfo:
    data_type: str
    nullable: bool


@dataclass(frozen=True)
class GoTable:
    """One of volumed's tables as the Go daemon left it."""

    name: str
    columns: dict[str, ColumnInfo]
    signs: tuple[str, ...]
    """What tells it from volumed's own table, in words."""

    def has(self, column: str) -> bool:
        return column in self.columns

    @property
    def volume_column(self) -> str:
        # Later Go generations renamed volume_id to volume_uuid.
        return "volume_id" if self.has("volume_id") else "volume_uuid"

    def described(self, most: int = 4) -> str:
        more = len(self.signs) - most
        signs = ", ".join(self.signs[:most]) + (f" and {more} more" if more > 0 else "")
        return f"{self.name} ({signs})"


def _signs(table: Table, columns: dict[str, ColumnInfo]) -> list[str]:
    """Why ``columns`` is not volumed's ``table``: a NOT NULL column volumed leaves null, an
    ENUM, a column only the Go daemon has. Empty for volumed's own table (also one an older
    volumed made: it only ever lacks columns, which are added)."""
    declared = {c.name: c for c in table.columns}
    out = []
    for name, info in columns.items():
        column = declared.get(name)
        if column is None:
            if name in _GO_ONLY:
                out.append(f"it has {name}")
        elif info.data_type == "enum":
            out.append(f"{name} is an ENUM")
        elif column.nullable and not info.nullable and name != table.primary_key:
            out.append(f"{name} is NOT NULL")
    key = columns.get("id")
    if table is DEVICE_MAPPINGS and key is not None and key.data_type != "bigint":
        # volumed's is AUTO_INCREMENT; the Go daemon's a string it makes itself.
        out.append(f"id is {key.data_type.upper()}")
    return out


# Columns only the Go daemon's tables have (either generation); one of them, or a NOT NULL or
# ENUM where volumed has neither, tells its tables from volumed's.
_GO_ONLY = frozenset(
    {
        "cloudstack_state",
        "linux_state",
        "volume_uuid",
        "vm_context_id",
        "volume_id_numeric",
        "operation_mode",
        "cloudstack_device_id",
        "requires_device_correlation",
        "ossea_snapshot_id",
        "snapshot_created_at",
        "snapshot_status",
        "persistent_device_name",
        "symlink_path",
    }
)
_TAKEN_OVER = (VOLUME_OPERATIONS, DEVICE_MAPPINGS)


async def inspect(conn: Connection) -> list[GoTable]:
    """The Go daemon's tables in the connection's database (MariaDB), in ``_TAKEN_OVER``
    order; empty when there are none."""
    names = [t.name for t in _TAKEN_OVER]
    rows = await conn.fetch(
        "SELECT TABLE_NAME AS t, COLUMN_NAME AS c, DATA_TYPE AS d, IS_NULLABLE AS n "
        "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME IN (%s, %s) ORDER BY ORDINAL_POSITION",
        names,
    )
    found = []
    for table in _TAKEN_OVER:
        columns = {
            str(r["c"]): ColumnInfo(str(r["d"]).lower(), r["n"] == "YES")
            for r in rows
            if r["t"] == table.name
        }
        if columns and (signs := _signs(table, columns)):
            found.append(GoTable(table.name, columns, tuple(signs)))
    return found


class GoTablesFound(StoreRefused):
    """The database holds the Go daemon's tables: volumed will not write to them until
    ``volumed migrate`` has converted them."""


def generation(found: Sequence[GoTable]) -> str:
    # Later Go generations renamed device_mappings.volume_id to volume_uuid.
    return "later" if any(t.has("volume_uuid") for t in found) else "first"


def found_text(found: Sequence[GoTable], where: str) -> str:
    described = "; ".join(t.described() for t in found)
    names = " and ".join(t.name for t in found)
    verb = "have" if len(found) > 1 else "has"
    return (
        f"{where}: {names} {verb} the Go daemon's shape ({generation(found)} generation): "
        f"{described}"
    )


def refusal(found: Sequence[GoTable], where: str) -> str:
    return (
        f"{found_text(found, where)}. volumed does not write to them. Stop the Go daemon, then "
        f"run `{COMMAND} --dry-run` to see the statements and `{COMMAND}` to convert them, "
        "keeping every row and the Go tables as backups (docs/migrating.md)"
    )


async def refuse_go_tables(conn: Connection, where: str) -> None:
    """The start-up check (MySQLBackend.open, before it creates or alters anything)."""
    found = await inspect(conn)
    if found:
        raise GoTablesFound(refusal(found, where))


# -- the conversion -----------------------------------------------------------------------


def _literal(at: dt.datetime) -> str:
    return "'" + at.strftime("%Y-%m-%d %H:%M:%S.%f") + "'"


def _text(value: str) -> str:
    """A string literal of our own text (no user data goes through here)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# Go columns whose values volumed keeps as they are (a '' aside).
_COPIED = frozenset({"id", "type", "volume_id", "vm_id", "request", "response", "created_at"})


def _operations_select(go: GoTable, now: str) -> dict[str, str]:
    """volume_operations column -> expression over the Go row ``g``."""
    unfinished = "g.status IN ('pending', 'executing')"
    terminal = ", ".join(_text(s) for s in sorted(TERMINAL))
    status = f"CASE WHEN g.status IN ({terminal}) THEN g.status ELSE 'failed' END"
    # Every status written is terminal (the unfinished ones become failed), and the terminal
    # statuses share one rank.
    (rank,) = {STATUS_RANK[s] for s in TERMINAL}
    stopped = STOPPED_MID_OPERATION.split("{status}")
    error = (
        f"CASE WHEN {unfinished} OR g.status IS NULL OR g.status = '' THEN JSON_OBJECT("
        f"'code', 'internal', 'message', CONCAT({_text(stopped[0])}, "
        f"COALESCE(NULLIF(g.status, ''), 'unknown'), {_text(stopped[1])})) "
        "WHEN g.error IS NOT NULL AND g.error <> '' THEN "
        "JSON_OBJECT('code', 'internal', 'message', g.error) "
        "WHEN g.status = 'failed' THEN JSON_OBJECT('code', 'internal', 'message', "
        "'failed in the Go daemon, which recorded no error') END"
    )
    select = {
        "id": "g.id",
        "type": "g.type",
        "status": status,
        "status_rank": str(rank),
        "volume_id": f"NULLIF(g.{go.volume_column}, '')",
        "vm_id": "NULLIF(g.vm_id, '')" if go.has("vm_id") else "NULL",
        "device_path": (
            "CASE WHEN JSON_VALID(g.response) THEN JSON_VALUE(g.response, '$.device_path') END"
            if go.has("response")
            else "NULL"
        ),
        "request": "g.request" if go.has("request") else "NULL",
        "response": "g.response" if go.has("response") else "NULL",
        "error": error,
        "event_at": f"CASE WHEN {unfinished} THEN {now} "
        f"ELSE COALESCE(g.completed_at, g.updated_at, g.created_at, {now}) END",
        "created_at": f"COALESCE(g.created_at, g.updated_at, {now})",
        "updated_at": f"CASE WHEN {unfinished} THEN {now} "
        f"ELSE COALESCE(g.updated_at, g.created_at, {now}) END",
        "completed_at": f"CASE WHEN {unfinished} THEN {now} "
        f"ELSE COALESCE(g.completed_at, g.updated_at, g.created_at) END",
    }
    if go.has("status_rank"):
        # A volumed started on the Go tables before it recognised them added its columns,
        # and the rows it managed to write there have status_rank: they are volumed's own
        # and keep its values (their later events wait in the stream, or were
        # dead-lettered: see docs/migrating.md).
        ours = [c.name for c in VOLUME_OPERATIONS.columns if go.has(c.name)]
        for name in (n for n in ours if n not in _COPIED):
            theirs = select.get(name, "NULL")
            select[name] = f"CASE WHEN g.status_rank IS NOT NULL THEN g.{name} ELSE {theirs} END"
    return select


def _mappings_select(go: GoTable, ops: GoTable | None, now: str) -> dict[str, str]:
    """device_mappings column -> expression over the Go row ``g``."""
    volume = f"g.{go.volume_column}"
    reason = IMPORTED_REASON.split("{device}")
    if ops is not None:
        # The attach that made the mapping, as the Go daemon recorded it: the correlator's
        # proofs name the row's operation_id, so any value works; this one is the truth.
        attach = (
            f"(SELECT o.id FROM {ops.name} o WHERE o.{ops.volume_column} = {volume} "
            "AND o.type = 'attach' AND o.status = 'completed' "
            "ORDER BY o.completed_at DESC, o.created_at DESC LIMIT 1)"
        )
    else:
        attach = "NULL"
    return {
        "volume_id": volume,
        "vm_id": "g.vm_id",
        # Not the Go daemon's name: a mapping names a device only once it is proven now.
        "device_path": "NULL",
        "by_id_path": "NULL",
        "size": "g.size" if go.has("size") else "NULL",
        "last_sync": f"COALESCE({'g.last_sync, ' if go.has('last_sync') else ''}{now})",
        "operation_id": attach,
        "attached_at": f"COALESCE(g.created_at, {now})" if go.has("created_at") else now,
        "proof": "'none'",
        "proof_reason": f"CONCAT({_text(reason[0])}, "
        f"COALESCE(NULLIF(g.device_path, ''), 'no device'), {_text(reason[1])})"
        if go.has("device_path")
        else _text(IMPORTED_REASON.format(device="no device")),
        "proven_at": "NULL",
    }


def _insert(table: Table, into: str, source: str, select: dict[str, str], where: str) -> str:
    missing = [
        c.name
        for c in table.columns
        if c.name not in select and not c.nullable and c.name != table.primary_key
    ]
    if missing:
        # A NOT NULL column added to TABLES needs its value from the Go rows written here.
        raise AssertionError(f"takeover: no value for {table.name}.{', '.join(missing)}")
    columns = [c.name for c in table.columns if c.name in select]
    return (
        f"INSERT INTO {into} ({', '.join(columns)})\nSELECT "
        + ",\n  ".join(select[c] for c in columns)
        + f"\nFROM {source} g{where}"
    )


@dataclass(frozen=True)
class Plan:
    statements: list[str]
    backups: dict[str, str]
    """table -> the name its Go version keeps."""


def plan(found: Sequence[GoTable], taken: set[str], now: dt.datetime) -> Plan:
    """Every statement of the takeover, in order. ``taken``: the table names in use (a
    backup name never replaces one). ``now`` is written into the converted rows as the time
    of the switch (UTC, like every time volumed stores)."""
    at = _literal(now)
    by_name = {t.name: t for t in found}
    tables = {t.name: t for t in TABLES}
    backups: dict[str, str] = {}
    statements = [
        # The Go daemon's TIMESTAMP columns are read in UTC, as volumed stores times.
        "SET time_zone = '+00:00'"
    ]
    for go in found:
        backup = f"{go.name}{BACKUP_INFIX}{now:%Y%m%d}"
        if backup in taken:
            backup = f"{backup}_{now:%H%M%S}"
        backups[go.name] = backup
        new = f"{go.name}{NEW_SUFFIX}"
        table = tables[go.name]
        if new in taken:
            # A left-over of an interrupted run: nothing reads it.
            statements.append(f"DROP TABLE {new}")
        statements.extend(MYSQL.table_ddl(replace(table, name=new)))
        if go.name == VOLUME_OPERATIONS.name:
            select, where = _operations_select(go, at), ""
        else:
            select = _mappings_select(go, by_name.get(VOLUME_OPERATIONS.name), at)
            # A row the Go daemon kept for a volume it says is detached is no attachment.
            where = (
                "\nWHERE COALESCE(LOWER(g.cloudstack_state), '') <> 'detached'"
                if go.has("cloudstack_state")
                else ""
            )
        statements.append(_insert(table, new, go.name, select, where))
    swaps = [f"{t} TO {b}, {t}{NEW_SUFFIX} TO {t}" for t, b in backups.items()]
    # One statement, atomic: the Go tables and volumed's swap places at once.
    statements.append("RENAME TABLE " + ", ".join(swaps))
    return Plan(statements, backups)


async def migrate(dsn: str, *, dry_run: bool, out: Callable[[str], None] = print) -> int:
    """``volumed migrate``: convert the Go daemon's tables (see the module's text). Returns
    the exit status."""
    # Imported here: backends imports this module for its start-up check.
    from actors.persistence.backends import MySQLBackend, unsupported_database

    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme == "sqlite":
        out(f"-- {mask_url_password(dsn)}: the Go daemon's tables live on MariaDB; nothing to do")
        return 0
    if scheme not in ("mysql", "mariadb"):
        # A mistyped DSN is not "nothing to do": the operator would take the site as migrated.
        raise unsupported_database(dsn)
    backend = await MySQLBackend.open(dsn, prepare=False)
    try:
        async with backend.connection() as conn:
            found = await inspect(conn)
            if not found:
                out(f"-- {backend.where}: no table has the Go daemon's shape; nothing to do")
                return 0
            taken = {
                str(r["t"])
                for r in await conn.fetch(
                    "SELECT TABLE_NAME AS t FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                )
            }
            counts = {
                t.name: int((await conn.fetch(f"SELECT COUNT(*) AS n FROM {t.name}"))[0]["n"])
                for t in found
            }
            steps = plan(found, taken, dt.datetime.now(dt.UTC).replace(tzinfo=None))
            out(f"-- {found_text(found, backend.where)}")
            for t in found:
                out(f"-- {t.name}: {counts[t.name]} rows; kept as {steps.backups[t.name]}")
            for statement in steps.statements:
                out(f"{statement};")
            if dry_run:
                out("-- dry run: nothing was changed")
                return 0
            for statement in steps.statements:
                await conn.execute(statement)
            for t in found:
                n = int((await conn.fetch(f"SELECT COUNT(*) AS n FROM {t.name}"))[0]["n"])
                # Fewer mappings: the Go rows of detached volumes, kept in the backup only.
                out(
                    f"-- {t.name}: {n} of {counts[t.name]} rows converted; all "
                    f"{counts[t.name]} kept in {steps.backups[t.name]}"
                )
            log.info("took over %s", ", ".join(t.name for t in found))
            return 0
    finally:
        await backend.close()
