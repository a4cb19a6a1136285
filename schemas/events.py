"""Operation events on ``volume.events.<operation_id>`` (contract §3)."""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from schemas.common import ErrorCode, OpType, Status


class ErrorInfo(Struct, kw_only=True):
    code: ErrorCode
    message: str


class OperationEvent(Struct, kw_only=True, omit_defaults=False):
    """One step of an operation. The first nine fields are the public contract.

    Extra fields (allowed by the contract) carry what the persistence writer stores:
    ``request`` on the first event, ``response`` (CloudStack's answer) on the terminal one,
    ``size`` of an attached volume for its device mapping, ``attached`` (below).
    """

    operation_id: str
    type: OpType
    status: Status
    volume_id: str | None = None
    vm_id: str | None = None
    device_path: str | None = None
    by_id_path: str | None = None
    error: ErrorInfo | None = None
    at: str
    request: Any = None
    response: Any = None
    size: int | None = None
    # The operation this one acts on (cancel) or the operation that caused it.
    target: str | None = None
    # On terminal attach, detach and delete events: whether the volume is attached to
    # ``vm_id`` after this operation, as far as volumed knows (None: unknown, or this
    # operation did not change it). Set on failed events too, so that device_mappings
    # follows what CloudStack did (a delete that detached and then failed, a roll-back).
    attached: bool | None = None
    # The operation's place: the sequence of its command in the command stream (the order
    # of a volume's operations, contract §3), the same on every event of the operation,
    # rejected ones included. Persistence decides which operation is newer by it, never by
    # ``at``. None: published by an executor older than this field.
    seq: int | None = None
    # Which host's clock ``at`` is on (the executor's Settings.clock): the correlator of
    # another host must never compare it with its own device times.
    clock: str | None = None
    # Set only on the rejection of a command that re-used this operation id with another body
    # (the value: that command's stream sequence). It is that command's one event, not a step
    # of the operation, whose own events go on around it: clients following the operation
    # skip it, and persistence keeps it out of the operation's row.
    rejected_copy: int | None = None
