"""The executor: takes volume commands from the command stream and carries them out.

Any number of executor processes share the command stream. For each command message:
1. Work out its operation id (body, else Nats-Msg-Id, else one derived from the message).
2. Claim the id in the operations bucket (KV create) and publish `pending` (or `rejected`
   for an invalid command). An id names the first command in the stream with it: before
   claiming, an earlier command with the id not yet acknowledged makes this one a copy
   (order.py ``first``). A copy, or a command whose id is claimed by another stream
   sequence, is a re-send if its body is the same (publish the latest event again, then
   wait until the operation has ended), else rejected `conflict` at once (its own event,
   ``rejected_copy``). A claim by this very sequence is a redelivery: resume it.
3. Wait for the volume's turn (order.py): every earlier command on the volume is done,
   whichever process ran it.
4. Hold the operation: its record is its lease (run.py): it runs in one process at a time,
   and a dead process's operation is taken over only once its record has stayed unchanged
   for a whole ttl. Before every CloudStack mutation the lease is checked; a process that
   lost it stops (Abandon).
5. Move the record pending → executing compare-and-set (a cancel may have won), publish
   `executing`, run the operation (operations.py), publish exactly one terminal event. (But
   an attach, every command's pending → executing goes with its run's first record write:
   before its first CloudStack mutation, or its terminal write; `executing` right after.)
The message is acknowledged only when the operation is terminal and its record's latest event
was published (bus/consumer.py makes every ack decision from the handler's outcome); until
then the consumer heartbeats it, so a crash hands it to another executor, which resumes from
the record, looking up in CloudStack whatever may have been sent, never sending it blind.

The parts: order.py (the volume's turn), run.py (one operation: record, lease, credentials),
operations.py (the CloudStack steps), records.py (records and their events, never going
backwards), identity.py (credentials and this host's VM id), devices.py (hand-offs to the
correlators), cloudstack.py (the API client).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import cast, get_args

import msgspec

from actors.executor.cloudstack import CloudStack, CloudStackError
from actors.executor.devices import BusDevices
from actors.executor.identity import LocalIdentity
from actors.executor.operations import (
    CreatesInFlight,
    Devices,
    OperationFailed,
    VolumeOwners,
    attachment_after,
)
from actors.executor.order import Identity, VolumeOrder
from actors.executor.records import Records
from actors.executor.run import HOLD_TTL, OperationRun
from actors.heartbeat import beat
from bus import Abandon, Bucket, Bus, Conflict, Consumer, Delivery, Reject
from bus.connection import StoredMessage
from bus.consumer import dead_letter
from bus.lease import RENEWALS_PER_TTL, LeaseLost, Leases
from bus.tasks import UNWIND, finish
from bus.topology import (
    ATTACHING_BUCKET,
    COMMANDS,
    CREATING_BUCKET,
    EXECUTOR,
    EXECUTOR_GIVEN_UP,
    LEASES_BUCKET,
    OPERATIONS_BUCKET,
    SERIALS_BUCKET,
    VOLUME_OWNERS_BUCKET,
)
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    InvalidCommand,
    decode_command,
    operation_id_in,
    request_of,
    volume_of,
)
from schemas.common import TERMINAL, OpType, is_operation_id, now_rfc3339
from schemas.config import Settings
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import (
    AttachInFlight,
    CheckResult,
    CreateInFlight,
    GivenUpAdvisory,
    LeaseHolder,
    OpRecord,
    SerialsShown,
    VolumeOwner,
)

log = logging.getLogger("volumed.executor")


class ExecutorActor:
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        instance: str,
        cloud: CloudStack | None = None,
        devices: Devices | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.instance = instance
        self.identity = LocalIdentity(bus, settings)
        self.cloud = cloud or CloudStack(
            self.identity.credentials, timeout=settings.cloudstack_timeout
        )
        self.devices: Devices = devices or BusDevices(bus)
        self._inflight: dict[str, int] = {}  # operation id → stream sequence being handled
        # VM id → whether its devices carry serials, as this process last read or wrote it
        # (the serials bucket is the truth, shared by every process on every host).
        self._serials: dict[str, bool] = {}
        self._serials_bucket: Bucket[SerialsShown] | None = None
        self._records: Records | None = None
        self._owners: VolumeOwners | None = None
        self._order: VolumeOrder | None = None
        self._leases: Leases | None = None
        # Operations running at once (past their turn and lease). Commands waiting for their
        # turn, a lease or their operation's end are parked (Delivery.parked): the consumer
        # takes as many again, so that waiters never keep what they wait for from being
        # delivered; a parked command that goes on may briefly make more, hence this bound.
        self._working = asyncio.Semaphore(settings.executor_concurrency)
        # The runs in this process, whose records (their leases) are renewed (_renewals).
        self._runs: set[OperationRun] = set()
        self._renew_now = asyncio.Event()
        self._creates: CreatesInFlight | None = None
        self._cloudstack_unavailable_since: float | None = None
        self._consumer: Consumer | None = None
        self._given_up: Consumer | None = None

    # -- running ------------------------------------------------------------------------------

    async def open(self) -> None:
        ops = await self.bus.bucket(OPERATIONS_BUCKET, OpRecord)
        attaching = await self.bus.bucket(ATTACHING_BUCKET, AttachInFlight)
        self._records = Records(self.bus, ops, attaching, self.settings.clock)
        self._owners = VolumeOwners(await self.bus.bucket(VOLUME_OWNERS_BUCKET, VolumeOwner))
        self._creates = CreatesInFlight(await self.bus.bucket(CREATING_BUCKET, CreateInFlight))
        self._order = VolumeOrder(self.bus, ops, EXECUTOR, self._identify)
        self._serials_bucket = await self.bus.bucket(SERIALS_BUCKET, SerialsShown)
        self._leases = Leases(
            await self.bus.bucket(LEASES_BUCKET, LeaseHolder), self.instance, LEASES_BUCKET.ttl
        )
        self.bus.on_reconnect.append(self._leases.renew_now)  # renewals missed in a blip
        self.bus.on_reconnect.append(self._renew_now.set)  # and the runs' records'

    @property
    def owners(self) -> VolumeOwners:
        assert self._owners is not None, "open() first"
        return self._owners

    @property
    def creates(self) -> CreatesInFlight:
        assert self._creates is not None, "open() first"
        return self._creates

    @property
    def records(self) -> Records:
        assert self._records is not None, "open() first"
        return self._records

    @property
    def order(self) -> VolumeOrder:
        assert self._order is not None, "open() first"
        return self._order

    @property
    def serials(self) -> Bucket[SerialsShown]:
        assert self._serials_bucket is not None, "open() first"
        return self._serials_bucket

    @property
    def leases(self) -> Leases:
        assert self._leases is not None, "open() first"
        return self._leases

    async def run(self) -> None:
        await self.open()
        self._consumer = Consumer(
            self.bus,
            EXECUTOR,
            self.handle,
            concurrency=self.settings.executor_concurrency,
            on_give_up=self.give_up,
            counted=self.counted,
        )
        self._given_up = Consumer(self.bus, EXECUTOR_GIVEN_UP, self.given_up, concurrency=4)
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self.leases.run()),
            asyncio.create_task(self._renewals()),
            asyncio.create_task(self._given_up.run()),
        ]
        try:
            await self._consumer.run()
        finally:
            self._given_up.stop()
            for task in background[:3]:
                task.cancel()
            # Within the supervisor's grace: the consumer took GRACE - UNWIND at most.
            await finish(background, UNWIND / 2, then=UNWIND / 2)
            self.order.close()
            await self.cloud.close()

    async def _renewals(self) -> None:
        """Renew the records of the runs here that have written nothing for a while
        (OperationRun.renew), and all of them at once after a reconnect (renewals may have
        failed during the cut). A short operation is never renewed: its writes do it."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), HOLD_TTL / RENEWALS_PER_TTL / 2)
            now_ = self._renew_now.is_set()
            self._renew_now.clear()
            await asyncio.gather(*(run.renew(now_=now_) for run in list(self._runs)))

    def stop(self) -> None:
        if self._consumer:
            self._consumer.stop()
        if self._given_up:
            self._given_up.stop()

    # -- one message ---------------------------------------------------------------------------

    @staticmethod
    def operation_id_of(data: bytes, headers: dict[str, str], stream_seq: int) -> str:
        """The body's operation_id, else the Nats-Msg-Id header, else one derived from the
        message itself (so that every delivery of it gets the same id)."""
        in_body = operation_id_in(data)
        if in_body is not None:
            return in_body
        header = headers.get("Nats-Msg-Id")
        if is_operation_id(header):
            return str(header)
        digest = hashlib.sha256(f"{stream_seq}:".encode() + data).hexdigest()
        return f"op-{digest[:24]}"

    def _identify(self, stored: StoredMessage) -> Identity:
        """A command's volume (None if it names none or is invalid), operation id and body."""
        op_type = stored.subject.rsplit(".", 1)[-1]
        op_id = self.operation_id_of(stored.data, stored.headers, stored.stream_seq)
        try:
            command: Command | None = decode_command(op_type, stored.data)
        except InvalidCommand:
            command = None
        return _identity(op_type, op_id, command)

    async def handle(self, d: Delivery) -> None:
        op_type = d.subject.rsplit(".", 1)[-1]
        op_id = self.operation_id_of(d.data, d.headers, d.stream_seq)
        command: Command | None = None
        invalid = ""
        try:
            command = decode_command(op_type, d.data)
        except InvalidCommand as e:
            invalid = str(e)
        identity = _identity(op_type, op_id, command)
        self.order.note(d.stream_seq, identity)
        if self._inflight.get(op_id) == d.stream_seq:
            raise Abandon(f"{op_id} is still being handled here")
        self._inflight.setdefault(op_id, d.stream_seq)
        try:
            await self._process(d, op_type, identity, command, invalid)
        except LeaseLost as e:
            # Another process may be running it now: touch nothing, answer nothing.
            raise Abandon(f"{op_id}: {e}") from None
        finally:
            if self._inflight.get(op_id) == d.stream_seq:
                del self._inflight[op_id]

    async def counted(self, d: Delivery) -> int:
        """How many deliveries of the command count against give_up_after, this one
        included: those before its claim (each failed), and those that ran its operation
        (``OpRecord.runs``); never those that only waited for their turn, nor a copy's."""
        op_id = self.operation_id_of(d.data, d.headers, d.stream_seq)
        got = await self.records.ops.get(op_id)
        if got is None:
            return d.num_delivered  # not claimed: every delivery failed before its claim
        record = got[0]
        if record.stream_seq != d.stream_seq:
            return 1  # a copy: it only waits for its operation (or is rejected at once)
        return record.claimed_on - 1 + record.runs + 1

    async def give_up(self, d: Delivery, reason: str) -> None:
        """The consumer gives the command up (its last delivery failed): its operation ends
        with it. Raising leaves the command to the server, which gives it up in turn; the
        given-up path ends it then (also after a restart)."""
        stored = StoredMessage(d.subject, d.data, d.headers, d.stream_seq)
        log.error("command %d failed for good: %s", d.stream_seq, reason)
        await self._fail_for_good(stored, reason)

    async def _process(
        self, d: Delivery, op_type: str, identity: Identity, command: Command | None, invalid: str
    ) -> None:
        op_id = identity.operation_id
        run = OperationRun(self, op_id)
        # A first delivery is nearly always a new command: it claims its id without reading
        # the record first (the claim is a KV create: one that finds the record reads it
        # then, below), which saves a request and its reply per operation. A redelivery
        # reads the record first, as it is most likely claimed already.
        fresh = d.num_delivered == 1
        got = None if fresh else await self.records.ops.get(op_id)
        claimed = False  # the record was created by this very handling
        first: tuple[int, Identity] | None = None
        if got is None:
            # One id, one operation: its first command in the stream. Before claiming the
            # id, look for an earlier command with it that is not claimed yet (delivered
            # late, or to a slower process): then this one is a copy, and must never take
            # the operation's place. (A redelivered copy of a claimed operation never gets
            # here: the record tells it.)
            first = await self.order.first(d.stream_seq, op_id)
            if first is not None and fresh:
                # A copy, unless the record says otherwise: it decides, as for a redelivery.
                got = await self.records.ops.get(op_id)
        if got is None:
            if first is not None:
                seq, original = first
                await self._copy(
                    d, op_type, identity, command, seq, original.body, original.volume_id
                )
                return
            record = OpRecord(
                operation_id=op_id,
                type=_op_type(op_type),
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
            try:
                await run.claim(record)
                claimed = True
            except Conflict:  # claimed already (a copy, or this very command redelivered
                # to another process meanwhile): the record tells which
                got = await self.records.ops.get(op_id)
                if got is None:  # deleted in between: treat as new next time
                    raise
        if got is not None:
            existing = got[0]
            if existing.stream_seq != d.stream_seq:
                # Claimed by an earlier command (or, from a volumed before one id named one
                # operation, by a later copy): this one is a copy of it.
                await self._copy(
                    d,
                    op_type,
                    identity,
                    command,
                    existing.stream_seq,
                    _record_body(existing),
                    existing.volume_id,
                )
                return
            log.info(
                "resuming operation %s (%s, status %s, phase %r)",
                op_id,
                existing.type,
                existing.status,
                existing.phase,
            )
            if existing.status in TERMINAL:
                await run.settle()
                return
            await self.records.publish_latest(op_id)
        if command is None:
            return  # rejected: its one event is out
        volume = volume_of(command)
        if volume is not None:
            with d.parked():
                await self.order.turn(volume, d.stream_seq, op_id)
        if not (claimed and not isinstance(command, AttachCommand)):
            # Read again, once no other run holds it (run.py: the record is the lease; a
            # run silent for a whole ttl is taken over): another process may have run it
            # meanwhile. (Claimed here, the record and its revision are known: pending, and
            # if it changed meanwhile, a cancel or another process that ran it while this
            # one stalled, the run's first write, compare-and-set, finds out before anything
            # is sent. An attach reads it: it writes the attaching bucket before its first
            # record write.)
            with d.parked():
                if not await run.load():
                    return  # it ended meanwhile: its latest event is out
        self._runs.add(run)  # renewed while it lasts (_renewals)
        try:
            # Credentials (and the local VM id) are read once per operation, when its turn
            # comes: a changed ossea_configs row applies to the next operation, never to half
            # of one. A row that cannot be read just now is waited for like CloudStack.
            with d.parked():
                creds = await self.identity.credentials(wait=self.settings.cloudstack_retry_budget)
            run.use(creds)
            async with self._gate_for(command, run, d), self._working:
                # This delivery runs the operation now: it counts against give_up_after
                # (saved with `executing`, or with the takeover when resumed).
                run.record.runs += 1
                if run.record.status != "pending":
                    run.take()  # resumed: compare-and-set on the revision found free
                    await run.save()
                elif isinstance(command, AttachCommand):
                    # An attach starts before anything else: the correlator counts an
                    # executing attach as in flight (announced first), and its gate is
                    # held from before `executing` (_gate_for).
                    await run.announce_attach(command)
                    if not await run.start():
                        if run.record.status not in TERMINAL:
                            raise Abandon(f"{op_id} was started elsewhere")
                        await run.settle()  # cancelled while it waited
                        return
                else:
                    run.defer_start()  # pending → executing with its first write (run.py)
                await run.execute(command)
        finally:
            self._runs.discard(run)
            # A run that did not end its operation lets go of it (a terminal write did).
            await run.release()

    async def _copy(
        self,
        d: Delivery,
        op_type: str,
        identity: Identity,
        command: Command | None,
        original_seq: int,
        original_body: str,
        original_volume: str | None,
    ) -> None:
        """A later command with an operation id already taken (by the command at
        ``original_seq``). The same body: a re-send, answered with the operation's latest
        event, and acknowledged once the operation has ended (a re-send never ends before
        its operation). Another body: rejected ``conflict`` at once; it waits for nothing
        and nothing waits for it."""
        op_id = identity.operation_id
        if identity.body == original_body:
            if d.num_delivered == 1:
                await self.records.publish_latest(op_id, again=True)
            with d.parked():
                await self.order.ended(op_id)  # (ended: its terminal event is out)
            return
        log.warning(
            "command %d re-uses operation id %s of command %d with another body: rejected",
            d.stream_seq,
            op_id,
            original_seq,
        )
        where = f" on volume {original_volume}" if original_volume else ""
        await self.records.reject_copy(
            op_id,
            _op_type(op_type),
            d.stream_seq,
            identity.volume_id,
            command.vm_id if isinstance(command, AttachCommand) else None,
            f"operation id {op_id} already names another operation (the command at stream "
            f"sequence {original_seq}{where}); this {op_type} command (stream sequence "
            f"{d.stream_seq}) has another body and was not carried out: send it with an "
            "operation id of its own",
            request_of(d.data),
        )

    @contextlib.asynccontextmanager
    async def _gate_for(
        self, command: Command, run: OperationRun, d: Delivery
    ) -> AsyncIterator[None]:
        """Until a host has shown that its devices carry serials, attaches to it start one
        at a time, whichever executor process runs them (the host's gate lease): its
        correlator can then prove a serial-less device is the volume of the only attach in
        flight. The gate is taken before the operation turns `executing`, which is what the
        correlator counts as in flight (and a waiting attach can still be cancelled).
        Losing the gate is safe: the correlator then sees two attaches in flight and proves
        neither device by exclusion."""
        if (
            not isinstance(command, AttachCommand)
            # Not served, and not this host's (if that is unknown, it may be: gated).
            or not (await run.serves(command.vm_id) or await run.local_vm_id() is None)
            or await self.serials_shown(command.vm_id)
        ):
            yield
            return
        with d.parked():
            gate = await self.leases.acquire(f"gate.{command.vm_id}")
        try:
            yield
        finally:
            await self.leases.release(gate)

    async def given_up(self, d: Delivery) -> None:
        """The server gave up on a command (its deliveries ran out, typically because the
        executor died during each): end its operation and dead-letter the command."""
        try:
            advisory = msgspec.json.decode(d.data, type=GivenUpAdvisory)
        except msgspec.ValidationError as e:
            raise Reject(f"not a max-deliveries advisory: {e}") from None
        await self.end_given_up(advisory)

    async def end_given_up(self, advisory: GivenUpAdvisory) -> None:
        stored = await self.bus.stored(COMMANDS.name, advisory.stream_seq)
        if stored is None:
            return  # the command has aged out of the stream: nothing left to name
        op_id = self.operation_id_of(stored.data, stored.headers, stored.stream_seq)
        if self._inflight.get(op_id) == stored.stream_seq:
            return  # still being worked on here: it ends by itself
        reason = f"its command was given up after {advisory.deliveries} deliveries"
        await dead_letter(
            self.bus,
            EXECUTOR,
            stored.subject,
            stored.data,
            stored.stream_seq,
            advisory.deliveries,
            reason,
        )
        await self._fail_for_good(stored, reason)

    async def _fail_for_good(self, stored: StoredMessage, reason: str) -> None:
        """End the command's operation with ``internal`` unless it has ended; either way
        its latest event is published (again) before this returns. A command that failed
        before it could claim its id claims it now, as failed: it ends with one event like
        any other. Only the operation's own command can end it: a copy that could not be
        handled must never fail the operation its first command runs (it waits for it, or
        is rejected ``conflict`` if its body differs). A process still running it keeps its
        lease: then this raises, and the given-up path tries again later."""
        identity = self._identify(stored)
        op_id = identity.operation_id
        first = await self.order.first(stored.stream_seq, op_id)
        got = await self.records.ops.get(op_id)
        if first is None and got is not None and got[0].stream_seq != stored.stream_seq:
            first = (got[0].stream_seq, Identity(got[0].volume_id, op_id, _record_body(got[0])))
        if first is not None:
            seq, original = first
            if original.body != identity.body:
                op_type = stored.subject.rsplit(".", 1)[-1]
                await self.records.reject_copy(
                    op_id,
                    _op_type(op_type),
                    stored.stream_seq,
                    identity.volume_id,
                    None,
                    f"operation id {op_id} already names another operation (the command at "
                    f"stream sequence {seq}); this {op_type} command (stream sequence "
                    f"{stored.stream_seq}) has another body and was not carried out",
                    request_of(stored.data),
                )
                return
            # A re-sent copy: it ends with its operation, never before (never failed by it).
            if got is None or got[0].status not in TERMINAL:
                raise RuntimeError(f"{op_id} is still running: its copy waits")
            await self.records.publish_latest(op_id)
            return
        await self._fail_unless_ended(stored, reason)

    async def _fail_unless_ended(self, stored: StoredMessage, reason: str) -> None:
        op_id = self.operation_id_of(stored.data, stored.headers, stored.stream_seq)
        run = OperationRun(self, op_id)
        while True:
            # Once no run holds it (run.py), else TimeoutError: it is tried again later.
            got = await self.records.free(op_id, run.ttl, timeout=1.5 * run.ttl)
            if got is None:
                with contextlib.suppress(Conflict):  # claimed meanwhile: look again
                    await run.claim(self._failed_claim(stored, op_id, reason))
                    return
                continue
            run.record, run.revision = got
            if run.record.status in TERMINAL:
                break
            with contextlib.suppress(Conflict):  # it moved meanwhile: look again
                await run.finish(
                    "failed",
                    error=ErrorInfo(
                        code="internal",
                        message=f"volumed could not process this operation: {reason}",
                    ),
                    attached=attachment_after(run.record),
                )
                return
        await run.settle()

    def _failed_claim(self, stored: StoredMessage, op_id: str, reason: str) -> OpRecord:
        """The record of a command that never got to claim its id, ending it ``failed``."""
        op_type = stored.subject.rsplit(".", 1)[-1]
        try:
            command: Command | None = decode_command(op_type, stored.data)
        except InvalidCommand:
            command = None
        record = OpRecord(
            operation_id=op_id,
            type=_op_type(op_type),
            status="failed",
            stream_seq=stored.stream_seq,
            command=stored.data if command else b"",
            volume_id=volume_of(command) if command else None,
            vm_id=command.vm_id if isinstance(command, AttachCommand) else None,
            accepted_at=now_rfc3339(),
        )
        record.last_event = self.records.event_for(
            record,
            "failed",
            request=request_of(stored.data),
            error=ErrorInfo(
                code="internal",
                message=f"volumed could not process this operation: {reason}",
            ),
        )
        return record

    # -- cancel --------------------------------------------------------------------------------

    async def cancel(self, target_id: str, by: str) -> OperationEvent:
        """Cancel ``target_id`` if it has not started; return the target's cancelled event.

        The cancelled event names the cancel ``by`` (its ``target``: the operation that
        caused it), so that the cancel, resumed after a crash between the two, finds its
        own work done instead of failing with not_cancellable."""
        for _ in range(20):
            got = await self.records.ops.get(target_id)
            if got is None:
                raise OperationFailed("not_found", f"no operation {target_id} is known")
            target, revision = got
            done = target.last_event
            if target.status == "cancelled" and done is not None and done.target == by:
                # This cancel, resumed: its work is done, but the target's event may not be
                # out (its publish failed, or the process died before it).
                await OperationRun(self, target_id).settle()
                return done
            if target.status != "pending":
                what = "is executing" if target.status == "executing" else f"is {target.status}"
                raise OperationFailed(
                    "not_cancellable",
                    f"operation {target_id} {what}; it can no longer be cancelled",
                )
            run = OperationRun(self, target_id)
            run.record, run.revision = target, revision
            try:
                await run.finish("cancelled", target=by)
            except Conflict:
                continue  # it moved meanwhile: look again
            assert target.last_event is not None
            return target.last_event
        raise OperationFailed("internal", f"operation {target_id} kept changing; try again")

    # -- health --------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        async def checks() -> dict[str, CheckResult]:
            return {"cloudstack": await self.probe_cloudstack(), "local_vm": self.identity.check()}

        await beat(self.bus, "executor", self.instance, self.settings.heartbeat_interval, checks)

    async def probe_cloudstack(self) -> CheckResult:
        start = time.perf_counter()
        try:
            # The cheapest read every CloudStack (and simulator) has; proves the endpoint
            # answers and accepts the credentials.
            await self.cloud.call("listVolumes", page=1, pagesize=1)
        except Exception as e:
            if isinstance(e, CloudStackError) and e.transient:
                # Operations retry for the retry budget meanwhile: degraded, not down.
                since = self._cloudstack_unavailable_since or time.time()
                self._cloudstack_unavailable_since = since
                at = dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                return CheckResult(
                    status="degraded",
                    detail=f"unavailable since {at} ({time.time() - since:.0f} s; operations "
                    f"retry for {self.settings.cloudstack_retry_budget:.0f} s): {e.message}",
                )
            self._cloudstack_unavailable_since = None
            if isinstance(e, CloudStackError):
                return CheckResult(status="down", detail=f"{e.code}: {e.message}")
            return CheckResult(status="down", detail=f"{type(e).__name__}")
        self._cloudstack_unavailable_since = None
        return CheckResult(
            status="ok",
            detail=f"listVolumes answered in {1000 * (time.perf_counter() - start):.0f} ms",
        )

    # -- for operations ------------------------------------------------------------------------

    async def note_proof(self, vm_id: str, proof: str, operation_id: str) -> None:
        """An attach to ``vm_id`` was proven: by its device's serial, or else (exclusion).
        Kept per host in the serials bucket, written only when it changes; a failed write
        only keeps the gate closed longer (or open until the next proof)."""
        shown = proof == "serial"
        if self._serials.get(vm_id) == shown:
            return
        try:
            if shown:
                await self.serials.put(
                    vm_id, SerialsShown(operation_id=operation_id, at=now_rfc3339())
                )
            else:
                await self.serials.delete(vm_id)
        except Exception as e:
            log.warning("could not note how attaches to %s were proven: %s", vm_id, e)
            return
        self._serials[vm_id] = shown

    async def serials_shown(self, vm_id: str) -> bool:
        """Whether the devices of ``vm_id`` have shown serials, in any executor process (an
        unreadable bucket counts as no: the gate stays closed, which is safe)."""
        try:
            shown = await self.serials.get(vm_id) is not None
        except Exception as e:
            log.debug("serials of %s unknown (%s): gated", vm_id, e)
            return False
        self._serials[vm_id] = shown
        return shown


def _identity(op_type: str, op_id: str, command: Command | None) -> Identity:
    """A command's volume, operation id and body key: equal for the same command re-sent,
    whatever the order or spacing of its fields and wherever its operation id was given."""
    if command is None:
        return Identity(None, op_id, f"{op_type}:invalid")
    fields = msgspec.json.encode(msgspec.structs.replace(command, operation_id=None))
    body = f"{op_type}:{hashlib.sha256(fields).hexdigest()[:32]}"
    return Identity(volume_of(command), op_id, body)


def _record_body(record: OpRecord) -> str:
    """The body key of the command that claimed ``record``."""
    try:
        command = decode_command(record.type, record.command) if record.command else None
    except InvalidCommand:
        command = None
    return _identity(record.type, record.operation_id, command).body


def _op_type(name: str) -> OpType:
    for t in get_args(OpType):
        if t == name:
            return cast(OpType, t)
    return "create"  # unreachable: the stream only captures the five command subjects
