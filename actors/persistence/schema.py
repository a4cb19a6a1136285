"""The tables volumed owns (contract §5), declared once as data, and the SQL dialects.

Both MariaDB and SQLite DDL are generated from ``TABLES``; ``deploy/schema.mysql.sql`` is
the MariaDB output (``python -m actors.persistence.schema`` prints it), so operators and the
code always create the same columns and indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnType = Literal[
    "id", "ref", "short", "path", "text", "json", "datetime", "bigint", "rank", "serial"
]


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    nullable: bool = True


@dataclass(frozen=True)
class Index:
    name: str
    columns: tuple[str, ...]
    unique: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: str
    indexes: tuple[Index, ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


# Longest values the columns hold; events with longer ones are rejected before they reach SQL.
MAX_ID = 64
MAX_REF = 255
MAX_PATH = 512

VOLUME_OPERATIONS = Table(
    name="volume_operations",
    primary_key="id",
    columns=(
        Column("id", "id", nullable=False),
        Column("type", "short", nullable=False),
        Column("status", "short", nullable=False),
        # STATUS_RANK of status: the forward-only comparison without a CASE in SQL.
        Column("status_rank", "rank", nullable=False),
        Column("volume_id", "ref"),
        Column("vm_id", "ref"),
        Column("device_path", "path"),
        Column("by_id_path", "path"),
        Column("target", "id"),
        Column("request", "json"),
        Column("response", "json"),
        Column("error", "json"),
        # ``at`` of the event that set the current status.
        Column("event_at", "datetime", nullable=False),
        # ``at`` of the earliest event seen: when the operation was accepted.
        Column("created_at", "datetime", nullable=False),
        # When this row last changed (database writer's clock).
        Column("updated_at", "datetime", nullable=False),
        # ``at`` of the terminal event.
        Column("completed_at", "datetime"),
        # The operation's place: its command's sequence in the command stream (the event's
        # ``seq``), the order of a volume's operations. NULL: events of an older executor.
        Column("seq", "bigint"),
    ),
    indexes=(
        Index("idx_volume_operations_status", ("status",)),
        Index("idx_volume_operations_volume_id", ("volume_id",)),
        Index("idx_volume_operations_vm_id", ("vm_id",)),
        Index("idx_volume_operations_created_at", ("created_at",)),
        Index("idx_volume_operations_type", ("type",)),
    ),
)

DEVICE_MAPPINGS = Table(
    name="device_mappings",
    primary_key="id",
    columns=(
        Column("id", "serial", nullable=False),
        Column("volume_id", "ref", nullable=False),
        Column("vm_id", "ref", nullable=False),
        # Unique per vm_id (several hosts share one database, each has its own /dev/vdb);
        # NULL for a volume attached to another VM (UNIQUE allows any number of NULLs).
        Column("device_path", "path"),
        Column("by_id_path", "path"),
        Column("size", "bigint"),
        Column("last_sync", "datetime", nullable=False),
        # The attach operation that created the mapping and its completion time (``at``,
        # shown only: which operation is newer is decided by volume_heads.seq, never a clock).
        Column("operation_id", "id"),
        Column("attached_at", "datetime"),
        # The correlator's latest proof of device_path (schemas.devices.MappingProof): how
        # ("serial", "exclusive", or "none" with device_path null), why not, and when (its
        # clock, shown only). NULL: as the attach proved it.
        Column("proof", "short"),
        Column("proof_reason", "text"),
        Column("proven_at", "datetime"),
        # The attach operation's command sequence (volume_operations.seq).
        Column("seq", "bigint"),
        # The mapping proofs stream's sequence of the proof applied last: an older proof
        # (delivered late) never overwrites a newer one.
        Column("proof_seq", "bigint"),
    ),
    indexes=(
        Index("uq_device_mappings_volume_id", ("volume_id",), unique=True),
        # Also the index of vm_id (its first column).
        Index("uq_device_mappings_vm_device_path", ("vm_id", "device_path"), unique=True),
    ),
)

VOLUME_HEADS = Table(
    name="volume_heads",
    primary_key="volume_id",
    columns=(
        Column("volume_id", "ref", nullable=False),
        # The command sequence of the newest operation whose outcome device_mappings shows
        # for this volume (an attach, detach or delete that ended knowing whether the volume
        # is attached): an operation with a lower one changes the mapping no more. It stays
        # after the mapping row is deleted, so a late attach cannot bring the row back.
        # 0: only events of an older executor (without seq) were applied.
        Column("seq", "bigint", nullable=False),
        Column("operation_id", "id"),
        # For events without seq only (an older executor's, still in the stream after an
        # upgrade): the completion time of the newest one applied, the previous version's rule.
        Column("legacy_at", "datetime"),
        # When this row last changed (database writer's clock, shown only).
        Column("updated_at", "datetime"),
    ),
)

TABLES = (VOLUME_OPERATIONS, DEVICE_MAPPINGS, VOLUME_HEADS)

# Indexes of earlier versions, dropped when a database is upgraded: (table, index).
RETIRED_INDEXES = (
    # device_path was unique across all VMs: a second host's /dev/vdb deleted the first's row.
    ("device_mappings", "uq_device_mappings_device_path"),
    # Covered by uq_device_mappings_vm_device_path.
    ("device_mappings", "idx_device_mappings_vm_id"),
)


@dataclass(frozen=True)
class Dialect:
    """Everything that differs between MariaDB and SQLite; the logic is shared."""

    name: Literal["mysql", "sqlite"]
    types: dict[ColumnType, str]
    param: str
    table_options: str
    inline_indexes: bool
    for_update: str
    # ``{updates}`` is filled with one assignment per column, built with ``assign``.
    upsert: str
    assign: str
    # An INSERT that keeps an existing row (and, on MariaDB, locks it): ``{key}`` is the
    # primary key column.
    keep: str
    # An upsert that changes an existing row only when the new row's ``{order}`` column is
    # higher, so that the affected row count says whether it did (0: kept): ``{updates}`` is
    # filled with one assignment per other column, built with ``assign_newer``. The order
    # column is assigned last: MariaDB assigns left to right, so every condition before it
    # compares with the row's old value.
    upsert_newer: str
    assign_newer: str

    def ddl(self) -> list[str]:
        """CREATE statements for every table and index, each safe to run again."""
        return [stmt for table in TABLES for stmt in self.table_ddl(table)]

    def table_ddl(self, table: Table) -> list[str]:
        lines = []
        for col in table.columns:
            sql_type = self.types[col.type]
            if col.name == table.primary_key:
                lines.append(f"{col.name} {sql_type} NOT NULL PRIMARY KEY")
            else:
                lines.append(f"{col.name} {sql_type}{'' if col.nullable else ' NOT NULL'}")
        separate = []
        for index in table.indexes:
            cols = ", ".join(index.columns)
            if self.inline_indexes:
                kind = "UNIQUE KEY" if index.unique else "KEY"
                lines.append(f"{kind} {index.name} ({cols})")
            else:
                kind = "UNIQUE INDEX" if index.unique else "INDEX"
                separate.append(
                    f"CREATE {kind} IF NOT EXISTS {index.name} ON {table.name} ({cols})"
                )
        body = ",\n  ".join(lines)
        create = f"CREATE TABLE IF NOT EXISTS {table.name} (\n  {body}\n){self.table_options}"
        return [create, *separate]

    def insert_or_keep_sql(self, table: Table, columns: tuple[str, ...]) -> str:
        placeholders = ", ".join("?" for _ in columns)
        return self.sql(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders}) "
            + self.keep.format(key=table.primary_key)
        )

    def upsert_newer_sql(
        self, table: Table, conflict: str, order: str, columns: tuple[str, ...]
    ) -> str:
        """INSERT ``columns`` (``conflict`` and ``order`` among them); an existing row is
        replaced only by a higher ``order``. Its row count: 1 inserted, 1 (SQLite) or 2
        (MariaDB) replaced, 0 kept (MariaDB: only without CLIENT.FOUND_ROWS, see
        backends.MySQLBackend.open)."""
        placeholders = ", ".join("?" for _ in columns)
        updates = ", ".join(
            self.assign_newer.format(c=c, order=order)
            for c in columns
            if c not in (conflict, order)
        )
        return self.sql(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders}) "
            + self.upsert_newer.format(
                table=table.name, conflict=conflict, order=order, updates=updates
            )
        )

    def index_ddl(self, table: Table, index: Index) -> str:
        """CREATE INDEX for an index added to ``table`` since it was created (IF NOT EXISTS:
        two processes may upgrade one database at once)."""
        kind = "UNIQUE INDEX" if index.unique else "INDEX"
        cols = ", ".join(index.columns)
        return f"CREATE {kind} IF NOT EXISTS {index.name} ON {table.name} ({cols})"

    def drop_index_ddl(self, table: str, index: str) -> str:
        on = f" ON {table}" if self.inline_indexes else ""
        return f"DROP INDEX IF EXISTS {index}{on}"

    def column_ddl(self, table: Table, column: Column) -> str:
        """ALTER TABLE for a column added to ``table`` since it was created (always
        nullable, so existing rows stay valid)."""
        return f"ALTER TABLE {table.name} ADD COLUMN {column.name} {self.types[column.type]}"

    def sql(self, text: str) -> str:
        """Shared SQL is written with ``?`` placeholders; none of it contains a literal ``?``
        or ``%``."""
        return text if self.param == "?" else text.replace("?", self.param)

    def upsert_sql(self, table: Table, conflict: str, columns: tuple[str, ...]) -> str:
        placeholders = ", ".join("?" for _ in columns)
        updates = ", ".join(self.assign.format(c=c) for c in columns if c != conflict)
        return self.sql(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders}) "
            + self.upsert.format(conflict=conflict, updates=updates)
        )


MYSQL = Dialect(
    name="mysql",
    types={
        "id": "VARCHAR(64)",
        "ref": "VARCHAR(255)",
        "short": "VARCHAR(16)",
        "path": "VARCHAR(512)",
        "text": "TEXT",
        "json": "JSON",
        "datetime": "DATETIME(6)",
        "bigint": "BIGINT",
        "rank": "TINYINT",
        "serial": "BIGINT AUTO_INCREMENT",
    },
    param="%s",
    # Binary collation: operation ids are case-sensitive ("a" and "A" are two operations).
    table_options=" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    inline_indexes=True,
    for_update=" FOR UPDATE",
    upsert="ON DUPLICATE KEY UPDATE {updates}",
    assign="{c} = VALUES({c})",
    # An exclusive record lock on the existing row (a duplicate primary key), unlike
    # INSERT IGNORE (a shared one: two writers would both hold it, then deadlock).
    keep="ON DUPLICATE KEY UPDATE {key} = {key}",
    upsert_newer="ON DUPLICATE KEY UPDATE {updates}, {order} = GREATEST({order}, VALUES({order}))",
    assign_newer="{c} = IF(VALUES({order}) > {order}, VALUES({c}), {c})",
)

SQLITE = Dialect(
    name="sqlite",
    types={
        "id": "TEXT",
        "ref": "TEXT",
        "short": "TEXT",
        "path": "TEXT",
        "text": "TEXT",
        "json": "TEXT",
        "datetime": "TEXT",
        "bigint": "INTEGER",
        "rank": "INTEGER",
        "serial": "INTEGER",
    },
    param="?",
    table_options="",
    inline_indexes=False,
    # SQLite locks the whole database with BEGIN IMMEDIATE instead.
    for_update="",
    upsert="ON CONFLICT({conflict}) DO UPDATE SET {updates}",
    assign="{c} = excluded.{c}",
    keep="ON CONFLICT({key}) DO NOTHING",
    upsert_newer="ON CONFLICT({conflict}) DO UPDATE SET {updates}, {order} = excluded.{order} "
    "WHERE excluded.{order} > {table}.{order}",
    assign_newer="{c} = excluded.{c}",
)


def mysql_schema_file() -> str:
    """The text of deploy/schema.mysql.sql."""
    header = (
        "-- volumed's tables on MariaDB 10.6+ (contract §5). volumed creates them itself when\n"
        "-- they are missing; this file is for operators who create them by hand.\n"
        "-- Generated by `python -m actors.persistence.schema`; keep the two in sync.\n"
    )
    return header + "".join(f"\n{stmt};\n" for stmt in MYSQL.ddl())


if __name__ == "__main__":
    print(mysql_schema_file(), end="")
