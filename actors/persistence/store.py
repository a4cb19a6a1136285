"""The database behind the persistence actor: the only code that runs SQL.

``open_store(dsn)`` picks MariaDB or SQLite by the DSN's scheme; both run the same
statements (``?`` placeholders, dialect differences in ``schema.Dialect``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from actors.persistence.backends import Backend, Connection, Row, open_backend
from actors.persistence.errors import StoreConflict, StoreRefused, StoreUnavailable
from actors.persistence.records import Event, OperationRow, format_time, merge, utcnow
from actors.persistence.schema import DEVICE_MAPPINGS, VOLUME_HEADS, VOLUME_OPERATIONS
from schemas.commands import CreateCommand
from schemas.common import TERMINAL
from schemas.devices import MappingProof, ProvenMapping
from schemas.internal import CloudStackCredentials, CreatesQuery
from schemas.queries import Mapping, Operation, OperationsQuery

log = logging.getLogger("volumed.persistence.store")
T = TypeVar("T")


class Store(Protocol):
    """What the persistence actor needs from a database."""

    where: str
    """The DSN without its password."""

    async def apply(self, events: Sequence[Event]) -> None:
        """Apply events (in this order) in one transaction, idempotently and forward-only."""
        ...

    async def apply_proof(self, proof: MappingProof, seq: int) -> int:
        """Apply a correlator's mapping proof in one transaction; return the rows changed.
        ``seq``: the proof's sequence in the mapping proofs stream (newer proofs, higher)."""
        ...

    async def operation(self, operation_id: str) -> Operation | None: ...

    async def operations(self, query: OperationsQuery) -> list[Operation]: ...

    async def creates_in_doubt(self, query: CreatesQuery) -> list[str]:
        """The other creates of the query's parameters that may have made a volume they have
        not claimed yet (schemas.internal.CreatesInDoubt)."""
        ...

    async def mapping_by_volume(self, volume_id: str) -> Mapping | None: ...

    async def mapping_by_device(self, device_path: str) -> Mapping | None: ...

    async def mappings_by_device(self, device_path: str, vm_id: str | None = None) -> list[Mapping]:
        """The mappings at ``device_path`` (of ``vm_id``, else of any VM: at most two)."""
        ...

    async def vm_volumes(self, vm_id: str) -> list[Mapping]: ...

    async def cloudstack_credentials(self) -> CloudStackCredentials:
        """The active ossea_configs row, or ``error`` saying why there is none."""
        ...

    async def ping(self) -> float:
        """Run a real query; return its latency in seconds."""
        ...

    async def close(self) -> None: ...


async def open_store(dsn: str) -> Store:
    """Connect, create the database (where allowed) and the missing tables.

    Raises StoreUnavailable when the server cannot be reached, StoreRefused (a kind of it)
    when the DSN or the server's answer rules it out; neither text contains the password.
    """
    return SqlStore(await open_backend(dsn))


_OP_COLUMNS = VOLUME_OPERATIONS.column_names
# Written only by a mapping proof (apply_proof), never by an attach's upsert.
_PROOF_COLUMNS = ("proof", "proof_reason", "proven_at", "proof_seq")
_MAP_COLUMNS = tuple(
    c for c in DEVICE_MAPPINGS.column_names if c != "id" and c not in _PROOF_COLUMNS
)
_json_decode = msgspec.json.decode


def _as_datetime(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _required_datetime(value: Any) -> dt.datetime:
    parsed = _as_datetime(value)
    assert parsed is not None
    return parsed


def _from_json(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bytes | str):
        return _json_decode(value)
    return value


def _row(r: Row) -> OperationRow:
    return OperationRow(
        id=r["id"],
        type=r["type"],
        status=r["status"],
        status_rank=int(r["status_rank"]),
        volume_id=r["volume_id"],
        vm_id=r["vm_id"],
        device_path=r["device_path"],
        by_id_path=r["by_id_path"],
        target=r["target"],
        request=r["request"],
        response=r["response"],
        error=r["error"],
        event_at=_required_datetime(r["event_at"]),
        created_at=_required_datetime(r["created_at"]),
        updated_at=_required_datetime(r["updated_at"]),
        completed_at=_as_datetime(r["completed_at"]),
    )


def _operation(r: Row) -> Operation:
    return Operation(
        operation_id=r["id"],
        type=r["type"],
        status=r["status"],
        volume_id=r["volume_id"],
        vm_id=r["vm_id"],
        device_path=r["device_path"],
        by_id_path=r["by_id_path"],
        error=_from_json(r["error"]),
        at=format_time(_as_datetime(r["event_at"])),
        request=_from_json(r["request"]),
        response=_from_json(r["response"]),
        created_at=format_time(_as_datetime(r["created_at"])),
        updated_at=format_time(_as_datetime(r["updated_at"])),
        completed_at=format_time(_as_datetime(r["completed_at"])),
        target=r["target"],
    )


def _mapping(r: Row) -> Mapping:
    return Mapping(
        volume_id=r["volume_id"],
        vm_id=r["vm_id"],
        device_path=r["device_path"],
        by_id_path=r["by_id_path"],
        size=None if r["size"] is None else int(r["size"]),
        last_sync=format_time(_as_datetime(r["last_sync"])),
        operation_id=r["operation_id"],
        proof=r["proof"],
        proof_reason=r["proof_reason"],
        proven_at=format_time(_as_datetime(r["proven_at"])),
    )


def _attached_after(event: Event, row: OperationRow) -> bool | None:
    """Whether the operation leaves the volume attached to its VM (the mapping follows);
    None: it changed nothing that the mapping shows.

    The event says so (``attached``, on failed events too: a delete that detached and then
    failed, an attach whose roll-back failed); an event without it (an older executor)
    follows the type: a completed attach attached, a completed detach or delete detached."""
    if row.type not in ("attach", "detach", "delete"):
        return None
    if event.raw.attached is not None:
        # Only an attach can say where the volume is attached (its VM and device); a detach
        # or delete that left it attached changed nothing the mapping shows.
        return event.raw.attached if row.type == "attach" or not event.raw.attached else None
    if row.status != "completed":
        return None
    return row.type == "attach"


@dataclass
class _Head:
    """A volume's row in volume_heads: the operation its mapping shows now."""

    seq: int
    operation_id: str | None
    legacy_at: dt.datetime | None


def _when(event: Event, row: OperationRow) -> dt.datetime:
    """An operation's completion time (its executor's clock): only for events without seq."""
    return row.completed_at or event.at


class SqlStore:
    """The Store on either backend."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend
        self.where = backend.where
        d = backend.dialect
        self._sql = d.sql
        self._for_update = d.for_update
        self._upsert_op = d.upsert_sql(VOLUME_OPERATIONS, "id", _OP_COLUMNS)
        # An attach's row starts with no proof of its own: a row it replaces (a detach that
        # was never recorded) must not lend it an older attach's proof.
        self._upsert_map = d.upsert_sql(DEVICE_MAPPINGS, "volume_id", _MAP_COLUMNS + _PROOF_COLUMNS)
        self._insert_head = d.insert_or_keep_sql(VOLUME_HEADS, ("volume_id", "seq"))
        self._upsert_head = d.upsert_sql(VOLUME_HEADS, "volume_id", VOLUME_HEADS.column_names)
        self._move_head_sql = d.upsert_newer_sql(
            VOLUME_HEADS, "volume_id", "seq", ("volume_id", "seq", "operation_id", "updated_at")
        )
        self._op_select = f"SELECT {', '.join(_OP_COLUMNS)} FROM volume_operations"
        self._map_select = f"SELECT {', '.join(_MAP_COLUMNS + _PROOF_COLUMNS)} FROM device_mappings"

    # -- writing --------------------------------------------------------------------------

    async def apply(self, events: Sequence[Event]) -> None:
        # A conflicting copy's rejection (another command that re-used the id) is published
        # on the operation's subject but is not the operation's: its row never sees it (here,
        # so that the consumer, dead-letter replays and rebuilds all skip it alike).
        events = [e for e in events if e.raw.rejected_copy is None]
        if events:
            await self._transaction(lambda tx: self._apply(tx, events))

    async def _transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction, again when another writer held its rows. Any
        other error is the database's (errors.py) and goes to the caller, whose write
        gate keeps the events waiting."""
        for attempt in range(4):
            try:
                async with self._db.transaction() as tx:
                    return await work(tx)
            except StoreConflict:
                # Another writer holds the rows (several persistence processes): go again.
                if attempt == 3:
                    raise
                await asyncio.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")

    async def _apply(self, tx: Connection, events: Sequence[Event]) -> None:
        ids = sorted({e.raw.operation_id for e in events})
        marks = ", ".join("?" for _ in ids)
        found = await tx.fetch(
            self._sql(f"{self._op_select} WHERE id IN ({marks}){self._for_update}"), ids
        )
        rows = {r["id"]: _row(r) for r in found}
        changed: dict[str, OperationRow] = {}
        effects: list[tuple[Event, OperationRow, bool]] = []
        resized: list[tuple[Event, OperationRow, str]] = []  # completed resizes, their volume
        now = utcnow()
        for event in events:
            before = rows.get(event.raw.operation_id)
            after = merge(before, event, now)
            if after is None:
                continue
            rows[after.id] = changed[after.id] = after
            # A device mapping changes once per operation: when it first becomes terminal.
            if after.status in TERMINAL and (before is None or before.status not in TERMINAL):
                attached = _attached_after(event, after)
                if attached is not None:
                    effects.append((event, after, attached))
                if after.type == "resize" and after.status == "completed" and after.volume_id:
                    resized.append((event, after, after.volume_id))
        if changed:
            await tx.executemany(
                self._upsert_op,
                [tuple(getattr(r, c) for c in _OP_COLUMNS) for r in changed.values()],
            )
        if not effects and not resized:
            return
        volume_ids = sorted(
            {r.volume_id for _, r, _ in effects if r.volume_id is not None}
            | {volume_id for _, _, volume_id in resized}
        )
        # One volume, every operation with its command sequence (the normal case): its head
        # is locked and moved by one conditional upsert per operation (_move_head). Several
        # volumes take their heads first, in volume order (_lock_heads); so do events of an
        # older executor (without seq), which need the head's other columns to compare.
        sequenced = all((r.seq or 0) > 0 for _, r, _ in effects) and all(
            (r.seq or 0) > 0 for _, r, _ in resized
        )
        heads = None
        if not sequenced or len(volume_ids) > 1:
            heads = await self._lock_heads(tx, volume_ids)
        moved: dict[str, _Head] = {}

        async def advance(event: Event, row: OperationRow, attached: bool) -> bool:
            """Whether the operation comes after the one the volume's mapping shows now; if
            so, the volume's head names it (from here on, or at the end: ``moved``)."""
            assert row.volume_id is not None
            if heads is None:
                return await self._move_head(tx, row, now)
            head = heads[row.volume_id]
            if not await self._newer(tx, head, event, row, attached):
                return False
            if row.seq is not None:
                head.seq = row.seq
            else:
                head.legacy_at = _when(event, row)
            head.operation_id = row.id
            moved[row.volume_id] = head
            return True

        for event, row, attached in effects:
            if row.volume_id is None:
                continue
            if not await advance(event, row, attached):
                log.info(
                    "%s of volume %s comes before the operation its mapping shows: no change",
                    row.id,
                    row.volume_id,
                    extra={"operation_id": row.id, "volume_id": row.volume_id},
                )
                continue
            if attached:
                await self._map(tx, event, row, now)
            else:
                await tx.write(
                    self._sql("DELETE FROM device_mappings WHERE volume_id = ?"), (row.volume_id,)
                )
        for event, row, _ in resized:
            # A completed resize: the volume's mapping (if it is attached) says its new size,
            # unless the mapping already shows a later operation (a later attach has its own
            # size, a later resize the newer one). Like every change of a mapping it moves
            # the volume's head.
            if event.raw.size is not None and await advance(event, row, False):
                await tx.write(
                    self._sql(
                        "UPDATE device_mappings SET size = ?, last_sync = ? WHERE volume_id = ?"
                    ),
                    (event.raw.size, now, row.volume_id),
                )
        if moved:
            await tx.executemany(
                self._upsert_head,
                [(v, h.seq, h.operation_id, h.legacy_at, now) for v, h in sorted(moved.items())],
            )

    async def _move_head(self, tx: Connection, row: OperationRow, now: dt.datetime) -> bool:
        """Whether the operation (with its command sequence) comes after the one its
        volume's mapping shows now (_newer); if so, the head names it from here on. One
        statement instead of _lock_heads' two and the upsert at the end: it locks the head
        row as _lock_heads does (MariaDB: an exclusive record lock on the existing row, or
        the row it inserts) and moves it only to a higher sequence; its row count says
        whether it did. legacy_at stays as it is: a sequence comes after every event
        without one."""
        changed = await tx.execute(self._move_head_sql, (row.volume_id, row.seq, row.id, now))
        return changed > 0

    async def _lock_heads(self, tx: Connection, volume_ids: list[str]) -> dict[str, _Head]:
        """The volumes' head rows, locked until the transaction ends: every writer that
        changes a volume's mapping takes its head first, so two persistence processes change
        a volume one after the other. Inserted where missing, then locked, in volume order in
        every transaction (no deadlock between two writers' batches): locks on existing rows
        (MariaDB: exclusive record locks, never gap locks, which two writers could both hold);
        SQLite serialises every writer with BEGIN IMMEDIATE already."""
        await tx.executemany(self._insert_head, [(v, 0) for v in volume_ids])
        marks = ", ".join("?" for _ in volume_ids)
        rows = await tx.fetch(
            self._sql(
                "SELECT volume_id, seq, operation_id, legacy_at FROM volume_heads "
                f"WHERE volume_id IN ({marks}){self._for_update}"
            ),
            volume_ids,
        )
        return {
            r["volume_id"]: _Head(int(r["seq"]), r["operation_id"], _as_datetime(r["legacy_at"]))
            for r in rows
        }

    async def _newer(
        self, tx: Connection, head: _Head, event: Event, row: OperationRow, attached: bool
    ) -> bool:
        """Whether the operation comes after the one the volume's mapping shows now.

        By command sequence: a volume's operations run in the order of their commands, so
        the highest sequence is the newest, whatever the clocks of the executors that ran
        them and in whatever order their events arrive. An event without seq (an older
        executor's, still in the stream after an upgrade) comes before every event with
        one; among those, the previous version's rule decides: completion times."""
        if row.seq is not None:
            return row.seq > head.seq
        if head.seq > 0:
            return False
        when = _when(event, row)
        since = head.legacy_at
        if since is None:
            # Applied before this version (no head yet): the mapping's own completion time.
            found = await tx.fetch(
                self._sql("SELECT attached_at FROM device_mappings WHERE volume_id = ?"),
                (row.volume_id,),
            )
            since = _as_datetime(found[0]["attached_at"]) if found else None
        if since is not None and when < since:
            return False
        if attached:
            # A completed detach or delete applied before this version left no head either.
            later = await tx.fetch(
                self._sql(
                    "SELECT id FROM volume_operations WHERE volume_id = ? "
                    "AND type IN ('detach', 'delete') AND status = 'completed' "
                    "AND seq IS NULL AND completed_at > ? LIMIT 1"
                ),
                (row.volume_id, when),
            )
            return not later
        return True

    async def _map(self, tx: Connection, event: Event, row: OperationRow, now: dt.datetime) -> None:
        if row.vm_id is None:
            log.warning(
                "attach %s completed without vm_id: no mapping",
                row.id,
                extra={"operation_id": row.id},
            )
            return
        device_path, by_id_path = row.device_path, row.by_id_path
        proof: tuple[str | None, ...] = (None,) * len(_PROOF_COLUMNS)
        if device_path is not None:
            holder = await tx.fetch(
                self._sql(
                    "SELECT volume_id, seq FROM device_mappings WHERE vm_id = ? "
                    f"AND device_path = ? AND volume_id <> ?{self._for_update}"
                ),
                (row.vm_id, device_path, row.volume_id),
            )
            if holder and int(holder[0]["seq"] or 0) > (row.seq or 0):
                # Another volume's newer attach holds the name: this attach's event is late
                # (the device was this volume's, then the kernel gave the name to the other
                # one). Its row names nothing until the correlator proves it again.
                other = holder[0]["volume_id"]
                device_path = by_id_path = None
                reason = f"{row.device_path} is recorded for volume {other}, attached later"
                proof = ("none", reason, None, None)
            elif holder:
                # The device is provably this volume's now; the other mapping naming it in
                # this VM belongs to a volume whose detach has not been recorded yet.
                # (Another VM's /dev/vdb is another disk: several hosts share one database.)
                await tx.execute(
                    self._sql("DELETE FROM device_mappings WHERE volume_id = ?"),
                    (holder[0]["volume_id"],),
                )
                log.warning(
                    "%s of VM %s now holds volume %s: stale mapping of volume %s removed",
                    device_path,
                    row.vm_id,
                    row.volume_id,
                    holder[0]["volume_id"],
                    extra={"operation_id": row.id, "volume_id": row.volume_id},
                )
        values = {
            "volume_id": row.volume_id,
            "vm_id": row.vm_id,
            "device_path": device_path,
            "by_id_path": by_id_path,
            "size": event.raw.size,
            "last_sync": now,
            "operation_id": row.id,
            "attached_at": row.completed_at or event.at,
            "seq": row.seq,
        }
        # An attach's row starts with no proof of an earlier attach (see __init__).
        await tx.execute(self._upsert_map, (*(values[c] for c in _MAP_COLUMNS), *proof))

    async def apply_proof(self, proof: MappingProof, seq: int) -> int:
        if not proof.mappings:
            return 0
        return await self._transaction(lambda tx: self._apply_proof(tx, proof, seq))

    async def _apply_proof(self, tx: Connection, proof: MappingProof, seq: int) -> int:
        """Only rows of the same attach (operation id) that no newer proof (higher ``seq``,
        never a clock) has set change. Names that change are nulled first, so that a swap
        (vdb <-> vdc) never meets the unique index; a name still recorded in this VM for a
        volume outside this proof is not taken."""
        at = dt.datetime.fromtimestamp(proof.at, dt.UTC).replace(tzinfo=None)
        wanted = {m.volume_id: m for m in proof.mappings}
        ids = sorted(wanted)
        marks = ", ".join("?" for _ in ids)
        found = await tx.fetch(
            self._sql(
                "SELECT volume_id, operation_id, device_path, proof_seq FROM device_mappings "
                f"WHERE vm_id = ? AND volume_id IN ({marks}){self._for_update}"
            ),
            (proof.vm_id, *ids),
        )
        rows = [
            r
            for r in found
            if r["operation_id"] == wanted[r["volume_id"]].operation_id
            and (r["proof_seq"] is None or int(r["proof_seq"]) < seq)
        ]
        moving = [
            r["volume_id"] for r in rows if r["device_path"] != wanted[r["volume_id"]].device_path
        ]
        if moving:
            marks = ", ".join("?" for _ in moving)
            await tx.execute(
                self._sql(
                    f"UPDATE device_mappings SET device_path = NULL WHERE volume_id IN ({marks})"
                ),
                moving,
            )
        now = utcnow()
        for r in rows:
            m = wanted[r["volume_id"]]
            if m.device_path is not None:
                holder = await tx.fetch(
                    self._sql(
                        "SELECT volume_id FROM device_mappings WHERE vm_id = ? "
                        "AND device_path = ? AND volume_id <> ?"
                    ),
                    (proof.vm_id, m.device_path, m.volume_id),
                )
                if holder:
                    m = ProvenMapping(
                        volume_id=m.volume_id,
                        operation_id=m.operation_id,
                        proof="none",
                        reason=f"{m.device_path} is proven to be this volume's, but it is "
                        f"still recorded for volume {holder[0]['volume_id']}",
                    )
            await tx.execute(
                self._sql(
                    "UPDATE device_mappings SET device_path = ?, by_id_path = ?, proof = ?, "
                    "proof_reason = ?, proven_at = ?, proof_seq = ?, last_sync = ? "
                    "WHERE volume_id = ?"
                ),
                (
                    m.device_path,
                    m.by_id_path,
                    m.proof,
                    m.reason or None,
                    at,
                    seq,
                    now,
                    m.volume_id,
                ),
            )
        return len(rows)

    # -- reading --------------------------------------------------------------------------

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        # A pooled connection may have died with a database restart: one fresh attempt.
        for attempt in (1, 2):
            try:
                async with self._db.connection() as conn:
                    return await conn.fetch(self._sql(sql), args)
            except StoreUnavailable:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def operation(self, operation_id: str) -> Operation | None:
        rows = await self._read(f"{self._op_select} WHERE id = ?", (operation_id,))
        return _operation(rows[0]) if rows else None

    async def operations(self, query: OperationsQuery) -> list[Operation]:
        where, args = [], []
        for name in ("type", "status", "volume_id", "vm_id"):
            value = getattr(query, name)
            if value is not None:
                where.append(f"{name} = ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"{self._op_select}{clause} ORDER BY created_at DESC, id DESC LIMIT ?",
            (*args, query.limit),
        )
        return [_operation(r) for r in rows]

    async def creates_in_doubt(self, query: CreatesQuery) -> list[str]:
        # Not ended; or failed (a cancel ends only a pending create, which sent nothing)
        # without naming a volume, within the day the creating bucket used to keep such an
        # entry: its createVolume may have made a volume after its last look. A create that
        # holds a volume is left out by the asker (volume owners), not here: the database
        # learns a create's volume only from its terminal event.
        rows = await self._read(
            "SELECT id, request FROM volume_operations WHERE type = 'create' AND id <> ? AND "
            "(status IN ('pending', 'executing') OR "
            "(status = 'failed' AND volume_id IS NULL AND updated_at >= ?))",
            (query.operation_id, utcnow() - dt.timedelta(days=1)),
        )
        found = []
        for r in rows:
            try:
                cmd = msgspec.convert(_from_json(r["request"]), CreateCommand)
            except (msgspec.MsgspecError, TypeError, ValueError):
                found.append(str(r["id"]))  # its parameters unknown: it may be one of them
                continue
            key = (cmd.name, cmd.size, cmd.zone_id, cmd.disk_offering_id)
            if key == (query.name, query.size, query.zone_id, query.disk_offering_id):
                found.append(str(r["id"]))
        return sorted(found)

    async def mapping_by_volume(self, volume_id: str) -> Mapping | None:
        rows = await self._read(f"{self._map_select} WHERE volume_id = ?", (volume_id,))
        return _mapping(rows[0]) if rows else None

    async def mapping_by_device(self, device_path: str) -> Mapping | None:
        found = await self.mappings_by_device(device_path)
        return found[0] if found else None

    async def mappings_by_device(self, device_path: str, vm_id: str | None = None) -> list[Mapping]:
        if vm_id is not None:
            rows = await self._read(
                f"{self._map_select} WHERE vm_id = ? AND device_path = ?", (vm_id, device_path)
            )
        else:
            rows = await self._read(
                f"{self._map_select} WHERE device_path = ? ORDER BY vm_id LIMIT 2", (device_path,)
            )
        return [_mapping(r) for r in rows]

    async def vm_volumes(self, vm_id: str) -> list[Mapping]:
        rows = await self._read(f"{self._map_select} WHERE vm_id = ? ORDER BY volume_id", (vm_id,))
        return [_mapping(r) for r in rows]

    async def cloudstack_credentials(self) -> CloudStackCredentials:
        try:
            rows = await self._read(
                "SELECT api_url, api_key, secret_key, oma_vm_id FROM ossea_configs "
                "WHERE is_active = 1 ORDER BY id DESC LIMIT 1"
            )
        except StoreRefused as e:
            if e.missing_table:
                return CloudStackCredentials(
                    error=f"the table ossea_configs does not exist in {self.where}"
                )
            return CloudStackCredentials(error=f"cannot read ossea_configs: {e}")
        except StoreUnavailable as e:
            return CloudStackCredentials(error=f"the database is unavailable: {e}", transient=True)
        if not rows:
            return CloudStackCredentials(
                error=f"ossea_configs in {self.where} has no active row (is_active = 1)"
            )
        r = rows[0]
        return CloudStackCredentials(
            endpoint=r["api_url"], key=r["api_key"], secret=r["secret_key"], vm_id=r["oma_vm_id"]
        )

    async def ping(self) -> float:
        start = time.perf_counter()
        async with self._db.connection() as conn:
            await conn.fetch("SELECT COUNT(*) AS n FROM volume_operations WHERE id = ''")
        return time.perf_counter() - start

    async def close(self) -> None:
        await self._db.close()
