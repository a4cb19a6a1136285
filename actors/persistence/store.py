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
from typing import Any, Protocol, TypeVar

import msgspec

from actors.persistence.backends import Backend, Connection, Row, open_backend
from actors.persistence.errors import StoreConflict, StoreRefused, StoreUnavailable
from actors.persistence.records import Event, OperationRow, format_time, merge, utcnow
from actors.persistence.schema import DEVICE_MAPPINGS, VOLUME_OPERATIONS
from schemas.common import TERMINAL
from schemas.devices import MappingProof, ProvenMapping
from schemas.internal import CloudStackCredentials
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

    async def apply_proof(self, proof: MappingProof) -> int:
        """Apply a correlator's mapping proof in one transaction; return the rows changed."""
        ...

    async def operation(self, operation_id: str) -> Operation | None: ...

    async def operations(self, query: OperationsQuery) -> list[Operation]: ...

    async def mapping_by_volume(self, volume_id: str) -> Mapping | None: ...

    async def mapping_by_device(self, device_path: str) -> Mapping | None: ...

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
_PROOF_COLUMNS = ("proof", "proof_reason", "proven_at")
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
        return event.raw.attached
    if row.status != "completed":
        return None
    return row.type == "attach"


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
        self._op_select = f"SELECT {', '.join(_OP_COLUMNS)} FROM volume_operations"
        self._map_select = f"SELECT {', '.join(_MAP_COLUMNS + _PROOF_COLUMNS)} FROM device_mappings"

    # -- writing --------------------------------------------------------------------------

    async def apply(self, events: Sequence[Event]) -> None:
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
        if changed:
            await tx.executemany(
                self._upsert_op,
                [tuple(getattr(r, c) for c in _OP_COLUMNS) for r in changed.values()],
            )
        for event, row, attached in effects:
            if attached:
                await self._map(tx, event, row, now)
            else:
                await self._unmap(tx, row)

    async def _map(self, tx: Connection, event: Event, row: OperationRow, now: dt.datetime) -> None:
        if row.volume_id is None or row.vm_id is None:
            log.warning(
                "attach %s completed without volume_id or vm_id: no mapping",
                row.id,
                extra={"operation_id": row.id},
            )
            return
        attached_at = row.completed_at or event.at
        # Events can arrive out of order (redeliveries): a detach or delete of this volume
        # that completed after this attach means the volume is no longer attached.
        later = await tx.fetch(
            self._sql(
                "SELECT id FROM volume_operations WHERE volume_id = ? "
                "AND type IN ('detach', 'delete') AND status = 'completed' "
                "AND completed_at > ? LIMIT 1"
            ),
            (row.volume_id, attached_at),
        )
        if later:
            return
        current = await tx.fetch(
            self._sql(
                f"SELECT attached_at FROM device_mappings WHERE volume_id = ?{self._for_update}"
            ),
            (row.volume_id,),
        )
        if current and (_as_datetime(current[0]["attached_at"]) or attached_at) > attached_at:
            return  # a newer attach of the same volume is already recorded
        if row.device_path is not None:
            # The device is provably this volume's now; a mapping still naming it belongs to
            # a volume whose detach has not been recorded yet.
            taken = await tx.execute(
                self._sql("DELETE FROM device_mappings WHERE device_path = ? AND volume_id <> ?"),
                (row.device_path, row.volume_id),
            )
            if taken:
                log.warning(
                    "%s now holds volume %s: stale mapping removed",
                    row.device_path,
                    row.volume_id,
                    extra={"operation_id": row.id, "volume_id": row.volume_id},
                )
        values = {
            "volume_id": row.volume_id,
            "vm_id": row.vm_id,
            "device_path": row.device_path,
            "by_id_path": row.by_id_path,
            "size": event.raw.size,
            "last_sync": now,
            "operation_id": row.id,
            "attached_at": attached_at,
        }
        proofless = (None,) * len(_PROOF_COLUMNS)
        await tx.execute(self._upsert_map, (*(values[c] for c in _MAP_COLUMNS), *proofless))

    async def _unmap(self, tx: Connection, row: OperationRow) -> None:
        if row.volume_id is None:
            return
        detached_at = row.completed_at or row.event_at
        # Only a mapping from an attach that completed before this detach is removed.
        await tx.execute(
            self._sql(
                "DELETE FROM device_mappings WHERE volume_id = ? "
                "AND (attached_at IS NULL OR attached_at <= ?)"
            ),
            (row.volume_id, detached_at),
        )

    async def apply_proof(self, proof: MappingProof) -> int:
        if not proof.mappings:
            return 0
        return await self._transaction(lambda tx: self._apply_proof(tx, proof))

    async def _apply_proof(self, tx: Connection, proof: MappingProof) -> int:
        """Only rows of the same attach (operation id) that no newer proof has set change.
        Names that change are nulled first, so that a swap (vdb <-> vdc) never meets the
        unique index; a name still recorded for a volume outside this proof is not taken."""
        at = dt.datetime.fromtimestamp(proof.at, dt.UTC).replace(tzinfo=None)
        wanted = {m.volume_id: m for m in proof.mappings}
        ids = sorted(wanted)
        marks = ", ".join("?" for _ in ids)
        found = await tx.fetch(
            self._sql(
                "SELECT volume_id, operation_id, device_path, proven_at FROM device_mappings "
                f"WHERE vm_id = ? AND volume_id IN ({marks}){self._for_update}"
            ),
            (proof.vm_id, *ids),
        )
        rows = [
            r
            for r in found
            if r["operation_id"] == wanted[r["volume_id"]].operation_id
            and (r["proven_at"] is None or _required_datetime(r["proven_at"]) <= at)
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
                        "SELECT volume_id FROM device_mappings WHERE device_path = ? "
                        "AND volume_id <> ?"
                    ),
                    (m.device_path, m.volume_id),
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
                    "proof_reason = ?, proven_at = ?, last_sync = ? WHERE volume_id = ?"
                ),
                (m.device_path, m.by_id_path, m.proof, m.reason or None, at, now, m.volume_id),
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

    async def mapping_by_volume(self, volume_id: str) -> Mapping | None:
        rows = await self._read(f"{self._map_select} WHERE volume_id = ?", (volume_id,))
        return _mapping(rows[0]) if rows else None

    async def mapping_by_device(self, device_path: str) -> Mapping | None:
        rows = await self._read(f"{self._map_select} WHERE device_path = ?", (device_path,))
        return _mapping(rows[0]) if rows else None

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
