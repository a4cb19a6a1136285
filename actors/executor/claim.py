"""The claim step of a command: which operation it names, and what this delivery does.

An operation id names one operation: the first command in the stream with it (order.py
``first``). A delivery claims the id by creating its record (a KV create); what it finds
decides the run step (actor.py), one of:
- ``New``: claimed now, by this delivery (an invalid command's record is claimed
  ``rejected``: its one event is out);
- ``Resume``: claimed by this very command (its stream sequence) before, not ended: a
  redelivery, which goes on from the record;
- ``Ended``: claimed by this very command before, and terminal: its latest event goes out
  (again), nothing runs;
- ``Copy``: another command holds the id and this one has the same body: a re-send,
  answered with the operation's latest event and acknowledged once it has ended;
- ``Conflicting``: another command holds the id and this one has another body: rejected
  ``conflict`` at once (an event of its own).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

from actors.executor.order import Identity
from actors.executor.run import Deps, OperationRun
from bus import Delivery
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    InvalidCommand,
    decode_command,
    request_of,
    volume_of,
)
from schemas.common import TERMINAL, OpType, now_rfc3339
from schemas.events import ErrorInfo
from schemas.internal import OpRecord


@dataclass(frozen=True)
class New:
    run: OperationRun  # its record and revision as this delivery created them


@dataclass(frozen=True)
class Resume:
    record: OpRecord  # as read (the run step reads it again under the lease)


@dataclass(frozen=True)
class Ended:
    record: OpRecord


@dataclass(frozen=True)
class Copy:
    original_seq: int  # the command that holds the id


@dataclass(frozen=True)
class Conflicting:
    original_seq: int  # the command that holds the id
    original_volume: str | None


Claim = New | Resume | Ended | Copy | Conflicting


async def claim(
    deps: Deps,
    d: Delivery,
    op_type: OpType,
    identity: Identity,
    command: Command | None,
    invalid: str,
) -> Claim:
    """Claim the command's operation id, or find who holds it (see the module's text)."""
    op_id = identity.operation_id
    # A first delivery is nearly always a new command: it claims its id without reading
    # the record first (the claim is a KV create: one that finds the record reads it
    # then, below), which saves a request and its reply per operation. A redelivery
    # reads the record first, as it is most likely claimed already.
    fresh = d.num_delivered == 1
    got = None if fresh else await deps.records.ops.get(op_id)
    if got is None:
        # One id, one operation: its first command in the stream. Before claiming the
        # id, look for an earlier command with it that is not claimed yet (delivered
        # late, or to a slower process): then this one is a copy, and must never take
        # the operation's place. (A redelivered copy of a claimed operation never gets
        # here: the record tells it.)
        first = await deps.order.first(d.stream_seq, op_id)
        if first is not None and fresh:
            # A copy, unless the record says otherwise: it decides, as for a redelivery.
            got = await deps.records.ops.get(op_id)
        if got is None and first is not None:
            seq, original = first
            return _copy(identity, seq, original.body, original.volume_id)
    if got is None:
        run = OperationRun(deps, op_id)
        if await run.claim(_new_record(run, d, op_type, command, invalid)):
            return New(run)
        # Claimed already (a copy, or this very command redelivered to another process
        # meanwhile): the record tells which.
        got = await deps.records.ops.get(op_id)
        if got is None:  # deleted in between: treat as new next time
            raise RuntimeError(f"the record of {op_id} was gone as soon as it was found")
    existing = got[0]
    if existing.stream_seq != d.stream_seq:
        # Claimed by an earlier command (or, from a volumed before one id named one
        # operation, by a later copy): this one is a copy of it.
        return _copy(identity, existing.stream_seq, record_body(existing), existing.volume_id)
    return Ended(existing) if existing.status in TERMINAL else Resume(existing)


def _copy(identity: Identity, seq: int, body: str, volume: str | None) -> Copy | Conflicting:
    return Copy(seq) if identity.body == body else Conflicting(seq, volume)


def _new_record(
    run: OperationRun, d: Delivery, op_type: OpType, command: Command | None, invalid: str
) -> OpRecord:
    record = OpRecord(
        operation_id=run.operation_id,
        type=op_type,
        status="rejected" if invalid else "pending",
        stream_seq=d.stream_seq,
        command=d.data if command else b"",
        volume_id=volume_of(command) if command else None,
        vm_id=command.vm_id if isinstance(command, AttachCommand) else None,
        accepted_at=now_rfc3339(),
        claimed_on=d.num_delivered,
    )
    record.last_event = run.event_for(
        record,
        record.status,
        request=request_of(d.data),
        error=ErrorInfo(code="invalid_request", message=invalid) if invalid else None,
        target=command.target if isinstance(command, CancelCommand) else None,
    )
    return record


def identity_of(op_type: str, op_id: str, command: Command | None) -> Identity:
    """A command's volume, operation id and body key: equal for the same command re-sent,
    whatever the order or spacing of its fields and wherever its operation id was given."""
    if command is None:
        return Identity(None, op_id, f"{op_type}:invalid")
    fields = msgspec.json.encode(msgspec.structs.replace(command, operation_id=None))
    body = f"{op_type}:{hashlib.sha256(fields).hexdigest()[:32]}"
    return Identity(volume_of(command), op_id, body)


def record_body(record: OpRecord) -> str:
    """The body key of the command that claimed ``record``."""
    try:
        command = decode_command(record.type, record.command) if record.command else None
    except InvalidCommand:
        command = None
    return identity_of(record.type, record.operation_id, command).body
