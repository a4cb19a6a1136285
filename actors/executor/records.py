"""Operation records and their events: the one place that changes either.

A record (the operations bucket, key: operation id) is created once (the idempotency
claim) and then changed compare-and-set on its revision, by the run that holds it (the
record is the operation's lease: ``holder``, run.py), by a cancel (pending → cancelled), or
by the give-up path once no run holds it (``free``). Each change of status carries the event that
announces it (``last_event``) and is published right after it is saved.

Events of one operation never go backwards: each record change and the publish of its event
hold the operation's lock (in this process), and every publish that is not the record's own
next step (a re-sent command, a resumed one) is publish-if-last on the events stream: read the
subject's last sequence, then the record, then publish only if nothing came in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

import msgspec

from actors.logs import SECRETS
from bus import Bucket, Bus, Conflict
from bus.connection import StoredMessage, encode
from bus.lease import now
from bus.tasks import Backoff
from bus.topology import EVENTS, event_subject
from schemas.common import TERMINAL, OpType, Status, now_rfc3339
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import AttachInFlight, OpRecord

_MAX_POLL = 0.25  # seconds between two reads of a held record


class Records:
    def __init__(
        self,
        bus: Bus,
        ops: Bucket[OpRecord],
        attaching: Bucket[AttachInFlight],
        clock: str,
    ) -> None:
        self.bus = bus
        self.ops = ops
        # The attaches in flight, for the correlator (written before an attach turns
        # executing, deleted with its terminal record).
        self.attaching = attaching
        self.clock = clock
        # One lock per operation id while anything here works on it (see the module doc).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Ids whose "latest event again" waits for the lock.
        self._queued_again: dict[str, object] = {}

    def lock_for(self, op_id: str) -> asyncio.Lock:
        lock = self._locks.get(op_id)
        if lock is None:
            lock = self._locks[op_id] = asyncio.Lock()
        return lock

    async def free(
        self, op_id: str, ttl: float, *, timeout: float | None = None
    ) -> tuple[OpRecord, int] | None:
        """The record once no run holds it (None if there is none): pending (not started:
        the write that starts it is compare-and-set), ended, let go (``holder`` empty), or
        held by a run that has written nothing for ``ttl`` seconds, as this process has
        watched it (run.py: the holder counts on its lease for less than that after its
        last write). TimeoutError after ``timeout`` seconds.

        Only this process's clock measures the silence: the same revision read at two
        moments ``ttl`` apart on it. Never a time written by another host (hosts' clocks
        differ), nor the server's."""
        deadline = None if timeout is None else now() + timeout
        seen: tuple[int, float] | None = None  # revision, when this process first read it
        backoff = Backoff(0.01, _MAX_POLL)
        while True:
            got = await self.ops.get(op_id)
            if got is None or not got[0].holder or got[0].status in TERMINAL:
                return got
            at = now()
            if seen is None or seen[0] != got[1]:
                seen = (got[1], at)  # (a write since: the holder is alive, watch again)
            elif at - seen[1] >= ttl:
                return got
            if deadline is not None and at + backoff.delay > deadline:
                raise TimeoutError(f"{op_id} is held by {got[0].holder}")
            await backoff.pause()

    def event_for(self, rec: OpRecord, status: Status, **extra: Any) -> OperationEvent:
        error = extra.get("error")
        if isinstance(error, ErrorInfo):
            # The safety net: error texts quote CloudStack's and libraries' texts, which must
            # not carry a known secret (or any URL's password) into events and records.
            extra["error"] = ErrorInfo(code=error.code, message=SECRETS.mask(error.message))
        return OperationEvent(
            operation_id=rec.operation_id,
            type=rec.type,
            status=status,
            volume_id=rec.volume_id,
            vm_id=rec.vm_id,
            at=now_rfc3339(),
            # The command's stream sequence (0 only for a record not yet loaded).
            seq=rec.stream_seq or None,
            clock=self.clock,
            **extra,
        )

    async def reject_copy(
        self,
        op_id: str,
        op_type: OpType,
        stream_seq: int,
        volume_id: str | None,
        vm_id: str | None,
        message: str,
        request: Any,
    ) -> None:
        """Publish the one event of a command that re-used ``op_id`` with another body: on
        the operation's subject (where its sender waits), marked ``rejected_copy`` so that
        nobody takes it for a step of the operation. Not under the operation's lock and not
        publish-if-last: it never changes the operation's record or its latest event."""
        event = self.event_for(
            OpRecord(
                operation_id=op_id,
                type=op_type,
                status="rejected",
                stream_seq=stream_seq,
                volume_id=volume_id,
                vm_id=vm_id,
            ),
            "rejected",
            error=ErrorInfo(code="conflict", message=message),
            request=request,
            rejected_copy=stream_seq,
        )
        await self.bus.publish(event_subject(op_id), event, msg_id=f"{op_id}:conflict:{stream_seq}")

    async def publish(self, record: OpRecord, *, if_last: int | None = None) -> None:
        """Publish the record's own event (its next step: the caller holds the lock)."""
        if record.last_event is not None:
            await self.publish_event(record.last_event, if_last=if_last)

    async def publish_event(self, event: OperationEvent, *, if_last: int | None = None) -> None:
        """Publish one step's event of an operation (the caller holds its lock)."""
        await self.bus.publish(
            event_subject(event.operation_id), event, msg_id=event_msg_id(event), if_last=if_last
        )

    async def publish_latest(self, op_id: str, *, again: bool = False) -> OpRecord | None:
        """Publish the operation's latest event (its record's), never an older one.

        Publish-if-last, so that it holds across processes too: the subject's last sequence
        is read before the record, and the publish is refused if anything was published on
        the subject in between (then both are read again). ``again``: publish it even if it
        is the last one stored (a re-sent command asks for it); else only if it is not."""
        if again:
            if op_id in self._queued_again:
                # One not yet started serves this copy too (its event goes out after this
                # copy came), and a flood of copies cannot starve the operation's own steps.
                return None
            self._queued_again[op_id] = token = object()
        try:
            async with self.lock_for(op_id):
                if again and self._queued_again.get(op_id) is token:
                    del self._queued_again[op_id]
                return await self._publish_latest(op_id, again)
        finally:
            if again and self._queued_again.get(op_id) is token:
                del self._queued_again[op_id]

    async def _publish_latest(self, op_id: str, again: bool) -> OpRecord | None:
        subject = event_subject(op_id)
        for _ in range(20):
            last = await self.bus.last_stored(EVENTS.name, subject)
            got = await self.ops.get(op_id)
            record = got[0] if got is not None else None
            event = record.last_event if record is not None else None
            if event is None:
                return record
            if not again and last is not None and last.data == encode(event):
                return record  # it is out already
            if record is not None and _skipped_executing(record, last):
                # Ended by its run's first write (a deferred start, run.py) and cut before
                # `executing` went out: that goes first, then (read again) the latest.
                with contextlib.suppress(Conflict):
                    await self.publish_event(
                        self.event_for(record, "executing"),
                        if_last=last.stream_seq if last is not None else 0,
                    )
                continue
            try:
                await self.bus.publish(
                    subject,
                    event,
                    msg_id=None if again else event_msg_id(event),
                    if_last=last.stream_seq if last is not None else 0,
                )
                return record
            except Conflict:
                continue  # something newer went out meanwhile: read both again
        raise RuntimeError(f"the events of {op_id} kept changing; its latest is not out yet")


class _Status(msgspec.Struct):
    status: str = ""


def _skipped_executing(record: OpRecord, last: StoredMessage | None) -> bool:
    """Whether the record ended a run (``runs``: a delivery started it) whose `executing`
    event never went out: the subject's last event is still `pending`. (A cancelled or
    rejected operation never executes; one given up while pending has no run.)"""
    if last is None or record.runs == 0 or record.status not in ("completed", "failed"):
        return False
    try:
        return msgspec.json.decode(last.data, type=_Status).status == "pending"
    except msgspec.DecodeError:
        return False


def event_msg_id(event: OperationEvent) -> str:
    """JetStream drops a second copy of one step's event published within its dedupe window
    (a step published again after a restart)."""
    return f"{event.operation_id}:{event.status}"
