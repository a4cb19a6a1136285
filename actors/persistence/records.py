"""Events as the database sees them: validation, and the forward-only merge into a row.

Pure functions, no I/O: the store runs them inside its transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from actors.persistence.schema import MAX_ID, MAX_PATH, MAX_REF
from schemas.common import STATUS_RANK, TERMINAL, is_operation_id
from schemas.events import OperationEvent

_decoder = msgspec.json.Decoder(OperationEvent)
_json = msgspec.json.Encoder()


class InvalidEvent(ValueError):
    """The event can never be stored; ``str(self)`` names the field and the reason."""


@dataclass(frozen=True)
class Event:
    """A validated OperationEvent with its time parsed (naive UTC, as stored)."""

    raw: OperationEvent
    at: dt.datetime


def decode_event(subject: str, data: bytes) -> Event:
    """Decode and validate one event from ``volume.events.<operation_id>``."""
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise InvalidEvent(f"invalid event: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidEvent(f"the event is not valid JSON: {e}") from None
    if not is_operation_id(event.operation_id):
        raise InvalidEvent("operation_id: must be 1 to 64 characters of A-Z a-z 0-9 _ -")
    suffix = subject.rsplit(".", 1)[-1]
    if subject.count(".") >= 2 and suffix != event.operation_id:
        raise InvalidEvent(
            f"operation_id: {event.operation_id!r} does not match the subject {subject!r}"
        )
    for name, limit in (
        ("volume_id", MAX_REF),
        ("vm_id", MAX_REF),
        ("device_path", MAX_PATH),
        ("by_id_path", MAX_PATH),
        ("target", MAX_ID),
    ):
        value = getattr(event, name)
        if value is not None and not 0 < len(value) <= limit:
            raise InvalidEvent(f"{name}: must be 1 to {limit} characters")
    if event.size is not None and not 0 <= event.size < 2**63:
        raise InvalidEvent("size: must be a number of bytes >= 0")
    for name in ("request", "response"):
        if _json_depth(getattr(event, name)) > MAX_JSON_DEPTH:
            raise InvalidEvent(f"{name}: nested deeper than {MAX_JSON_DEPTH} levels")
    if event.seq is not None and not 0 < event.seq < 2**63:
        raise InvalidEvent("seq: must be a command stream sequence (> 0)")
    return Event(raw=event, at=parse_time(event.at))


# What passes decode_event fits every column on both databases, so that any error the
# database returns is its own state and the event waits for it (errors.py). Beyond the
# lengths above: MariaDB's JSON columns check JSON_VALID, which fails past 31 levels of
# nesting, and its DATETIME holds the years 1000 to 9999 only.
MAX_JSON_DEPTH = 31
_YEARS = range(1000, 10000)


def _json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_json_depth, value), default=0)
    return 0


def parse_time(value: str) -> dt.datetime:
    """An RFC 3339 timestamp as naive UTC (no zone means UTC)."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEvent(f"at: {value!r} is not an RFC 3339 timestamp") from None
    try:
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    except OverflowError:
        parsed = dt.datetime.min
    if parsed.year not in _YEARS:
        raise InvalidEvent(f"at: {value!r} is outside the years 1000 to 9999")
    return parsed


def format_time(value: dt.datetime | str | None) -> str | None:
    """A stored time as RFC 3339 UTC with microseconds and 'Z'."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def encode_json(value: Any) -> str | None:
    return None if value is None else _json.encode(value).decode()


@dataclass(frozen=True)
class OperationRow:
    """One row of volume_operations, JSON columns kept as text."""

    id: str
    type: str
    status: str
    status_rank: int
    volume_id: str | None
    vm_id: str | None
    device_path: str | None
    by_id_path: str | None
    target: str | None
    request: str | None
    response: str | None
    error: str | None
    event_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None
    seq: int | None = None  # the command's stream sequence: the operation's place


# Fields a later event may fill; request belongs to the first (pending) event.
_LATER_FIELDS = ("volume_id", "vm_id", "device_path", "by_id_path", "target", "response", "error")


def _event_values(event: Event) -> dict[str, Any]:
    e = event.raw
    return {
        "volume_id": e.volume_id,
        "vm_id": e.vm_id,
        "device_path": e.device_path,
        "by_id_path": e.by_id_path,
        "target": e.target,
        "request": encode_json(e.request),
        "response": encode_json(e.response),
        "error": encode_json(e.error),
    }


def merge(row: OperationRow | None, event: Event, now: dt.datetime) -> OperationRow | None:
    """The row after ``event``, or None when the event changes nothing.

    Forward-only: a higher status rank moves the row on and overwrites fields the event
    carries; an equal rank only fills NULL fields; a lower rank only fills a missing
    request (it belongs to the first event), a missing seq and an earlier created_at. A
    non-null value is never replaced by null.
    """
    e = event.raw
    rank = STATUS_RANK[e.status]
    values = _event_values(event)
    if row is None:
        return OperationRow(
            id=e.operation_id,
            type=e.type,
            status=e.status,
            status_rank=rank,
            event_at=event.at,
            created_at=event.at,
            updated_at=now,
            completed_at=event.at if e.status in TERMINAL else None,
            seq=e.seq,
            **values,
        )
    changes: dict[str, Any] = {}
    if rank > row.status_rank:
        changes.update(status=e.status, status_rank=rank, event_at=event.at)
        if e.status in TERMINAL:
            changes["completed_at"] = event.at
        changes.update({k: values[k] for k in _LATER_FIELDS if values[k] is not None})
    elif rank == row.status_rank:
        changes.update(
            {
                k: values[k]
                for k in _LATER_FIELDS
                if values[k] is not None and getattr(row, k) is None
            }
        )
    if row.seq is None and e.seq is not None:
        # Every event of an operation carries the same seq; an older executor's none.
        changes["seq"] = e.seq
    if row.request is None and values["request"] is not None:
        changes["request"] = values["request"]
    if event.at < row.created_at:
        changes["created_at"] = event.at
    changes = {k: v for k, v in changes.items() if getattr(row, k) != v}
    if not changes:
        return None
    return replace(row, updated_at=now, **changes)
