"""volumed's answers (events, query replies) in the Go daemon's shapes (schemas.rest).

Pure functions: the gateway's handlers ask NATS, these only translate.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.commands import Command, operation_type_of, volume_of
from schemas.events import OperationEvent
from schemas.queries import Check, Health, Mapping, Operation
from schemas.rest import (
    HealthDocument,
    RestMapping,
    RestOperation,
    RestStatus,
    VmVolume,
    VolumeStatus,
)

# volumed's `rejected` is a failure to a Go caller: it polls until completed, failed or
# cancelled, and would wait its whole timeout for a status it does not know.
_STATUS: dict[str, RestStatus] = {
    "pending": "pending",
    "executing": "executing",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "rejected": "failed",
}
_HEALTH = {"ok": "healthy", "degraded": "degraded", "down": "unhealthy"}


def _object(value: Any) -> dict[str, Any]:
    """Go callers decode ``request`` into a map: a body that was not a JSON object (a
    rejected command's text) is wrapped rather than breaking their decoder."""
    if isinstance(value, dict):
        return value
    return {} if value is None else {"body": value}


def operation(op: Operation, now: str) -> RestOperation:
    """A record of the ``operation`` / ``operations`` queries."""
    error = op.error or {}
    created = op.created_at or op.at or now
    return RestOperation(
        id=op.operation_id,
        type=op.type,
        status=_STATUS.get(op.status, "failed"),
        volume_id=op.volume_id or "",
        vm_id=op.vm_id,
        request=_object(op.request),
        response=None if op.response is None else _object(op.response),
        error=error.get("message"),
        created_at=created,
        updated_at=op.updated_at or op.at or created,
        completed_at=op.completed_at,
        error_code=error.get("code"),
        device_path=op.device_path,
        by_id_path=op.by_id_path,
    )


def operation_of_event(event: OperationEvent, request: Any) -> RestOperation:
    """The operation as its first event shows it, for a 201 when the database's record is
    not there to read (the persistence actor is away or slow)."""
    terminal = event.status in ("completed", "failed", "cancelled", "rejected")
    return RestOperation(
        id=event.operation_id,
        type=event.type,
        status=_STATUS[event.status],
        volume_id=event.volume_id or "",
        vm_id=event.vm_id,
        request=_object(event.request if event.request is not None else request),
        response=None if event.response is None else _object(event.response),
        error=event.error.message if event.error else None,
        created_at=event.at,
        updated_at=event.at,
        completed_at=event.at if terminal else None,
        error_code=event.error.code if event.error else None,
        device_path=event.device_path,
        by_id_path=event.by_id_path,
    )


def accepted(command: Command, now: str) -> RestOperation:
    """A command JetStream has taken whose first event has not come yet (no executor is
    running): it is pending, and becomes the operation once an executor takes it."""
    assert command.operation_id is not None
    vm_id = getattr(command, "vm_id", None)
    return RestOperation(
        id=command.operation_id,
        type=operation_type_of(command),
        status="pending",
        volume_id=volume_of(command) or "",
        vm_id=vm_id,
        request=msgspec.to_builtins(command),
        response=None,
        error=None,
        created_at=now,
        updated_at=now,
        completed_at=None,
    )


def mapping(m: Mapping) -> RestMapping:
    """A device mapping. ``id`` is the attach operation that made it (the Go daemon's row
    id is gone with its table's shape); its times are the last write or proof."""
    return RestMapping(
        id=m.operation_id or m.volume_id,
        volume_id=m.volume_id,
        vm_id=m.vm_id,
        device_path=m.device_path,
        cloudstack_state="attached",
        linux_state="present" if m.device_path else "unproven",
        size=m.size,
        last_sync=m.last_sync,
        created_at=m.last_sync,
        # The later of the two: a proof is written with the mapping, a moment before it.
        updated_at=max(filter(None, (m.last_sync, m.proven_at)), default=None),
        by_id_path=m.by_id_path,
        proof=m.proof,
        proof_reason=m.proof_reason,
        proven_at=m.proven_at,
    )


def vm_volume(m: Mapping, attached_at: str | None) -> VmVolume:
    return VmVolume(
        volume_id=m.volume_id,
        vm_id=m.vm_id,
        device_path=m.device_path,
        attached_at=attached_at or m.last_sync,
    )


def volume_status(
    volume_id: str, m: Mapping | None, ops: list[Operation], now: str
) -> VolumeStatus:
    """What volumed knows of a volume: its mapping, and its operations newest first."""
    done = next((op for op in ops if op.status == "completed"), None)
    if m is not None:
        state = "attached"
    elif done is None:
        state = "unknown"
    elif done.type == "delete":
        state = "deleted"
    else:
        # A completed create or detach, or an attach whose mapping has since gone (a
        # detach not seen by volumed): not attached as far as volumed knows.
        state = "available"
    size = m.size if m is not None else None
    if size is None:
        create = next((op for op in ops if op.type == "create"), None)
        if create is not None and isinstance(create.request, dict):
            requested = create.request.get("size")
            size = requested if isinstance(requested, int) else None
    linux = None
    if m is not None:
        linux = {
            "device_path": m.device_path,
            "by_id_path": m.by_id_path,
            "proof": m.proof,
            "proof_reason": m.proof_reason,
            "proven_at": m.proven_at,
        }
    return VolumeStatus(
        volume_id=volume_id,
        vm_id=m.vm_id if m is not None else None,
        device_path=m.device_path if m is not None else None,
        state=state,  # type: ignore[arg-type]
        size=size,
        cloudstack_data={},
        linux_data=linux,
        last_operation=operation(ops[0], now) if ops else None,
    )


def _said(check: Check | None) -> str:
    """A check as the Go daemon said it: "healthy", or the status and why."""
    if check is None:
        return "unknown: not reported"
    return "healthy" if check.status == "ok" else f"{check.status}: {check.detail}"


def unanswered_health(why: str, now: str) -> HealthDocument:
    """Health as a Go caller reads it when nothing answers volumed's health query."""
    down = f"down: no answer to the health query ({why})"
    return HealthDocument(
        status="unhealthy",
        timestamp=now,
        cloudstack_health="unknown: not reported",
        database_health=down,
        device_monitor="unknown: not reported",
        details={"persistence": down},
    )


def health(h: Health, now: str) -> HealthDocument:
    return HealthDocument(
        status=_HEALTH[h.status],  # type: ignore[arg-type]
        timestamp=now,
        cloudstack_health=_said(h.checks.get("cloudstack")),
        database_health=_said(h.checks.get("database")),
        device_monitor=_said(h.checks.get("device_watcher")),
        details={name: f"{c.status}: {c.detail}" for name, c in sorted(h.checks.items())},
    )
