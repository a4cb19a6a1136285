"""The executor: takes volume commands from the command stream and carries them out.

Any number of executor processes share the command stream. For each command message:
1. Work out its operation id (body, else Nats-Msg-Id, else one derived from the message).
2. Claim the id in the operations bucket (KV create) and publish `pending` (or `rejected`
   for an invalid command): claim.py, whose typed outcome decides the rest. An id names
   the first command in the stream with it: before claiming, an earlier command with the
   id not yet acknowledged makes this one a copy (order.py ``first``). A copy, or a
   command whose id is claimed by another stream sequence, is a re-send if its body is the
   same (``Copy``: publish the latest event again, then wait until the operation has
   ended), else rejected `conflict` at once (``Conflicting``: its own event,
   ``rejected_copy``). A claim by this very sequence is a redelivery: resume it
   (``Resume``), or publish its latest event if it has ended (``Ended``).
3. Wait for the volume's turn (order.py): every earlier command on the volume is done,
   whichever process ran it.
4. Hold the operation: its record is its lease (run.py): it runs in one process at a time,
   and a dead process's operation is taken over only once its record has stayed unchanged
   for a whole ttl. Before every CloudStack mutation the lease is checked; a process that
   lost it stops (Abandon).
5. Move the record pending → executing compare-and-set (a cancel may have won), publish
   `executing`, run the operation (operations.py), publish exactly one terminal event. (On
   its first delivery, but an attach, a command's pending → executing goes with its run's
   first record write: before its first CloudStack mutation, or its terminal write;
   `executing` right after. A redelivery starts first, so that it counts: give_up_after.)
The message is acknowledged only when the operation is terminal and its record's latest event
was published (bus/consumer.py makes every ack decision from the handler's outcome); until
then the consumer heartbeats it, so a crash hands it to another executor, which resumes from
the record, looking up in CloudStack whatever may have been sent, never sending it blind.

The parts: claim.py (the claim step), order.py (the volume's turn), run.py (one operation:
record, lease, credentials, built from ``Deps``; cancel), serials.py (hosts that show device
serials), operations.py (the CloudStack steps), records.py (records and their events, never going
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

from actors.executor.claim import (
    Claim,
    Conflicting,
    Copy,
    Ended,
    New,
    claim,
    identity_of,
    record_body,
)
from actors.executor.cloudstack import CloudStack, CloudStackError
from actors.executor.devices import BusDevices
from actors.executor.identity import LocalIdentity
from actors.executor.operations import (
    Devices,
    OtherCreates,
    VolumeOwners,
    attachment_after,
)
from actors.executor.order import Identity, VolumeOrder
from actors.executor.records import Records
from actors.executor.resize import DeviceSizes
from actors.executor.run import HOLD_TTL, Deps, OperationRun
from actors.executor.serials import Serials
from actors.heartbeat import beat
from bus import Abandon, Bus, Conflict, Consumer, Delivery, Reject
from bus.connection import StoredMessage
from bus.lease import RENEWALS_PER_TTL, LeaseLost, Leases
from bus.tasks import UNWIND, finish
from bus.topology import (
    ATTACHING_BUCKET,
    EXECUTOR,
    LEASES_BUCKET,
    OPERATIONS_BUCKET,
    SERIALS_BUCKET,
    VOLUME_OWNERS_BUCKET,
)
from schemas.commands import (
    AttachCommand,
    Command,
    InvalidCommand,
    decode_command,
    operation_id_in,
    request_of,
    volume_of,
)
from schemas.common import TERMINAL, OpType, is_operation_id, now_rfc3339, op_type_of
from schemas.config import Settings
from schemas.events import ErrorInfo
from schemas.internal import (
    AttachInFlight,
    CheckResult,
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
        self._deps: Deps | None = None  # what every operation uses (open())
        self._leases: Leases | None = None
        # Operations running at once (past their turn and lease). Commands waiting for their
        # turn, a lease or their operation's end are parked (Delivery.parked): the consumer
        # takes as many again, so that waiters never keep what they wait for from being
        # delivered; a parked command that goes on may briefly make more, hence this bound.
        self._working = asyncio.Semaphore(settings.executor_concurrency)
        # The runs in this process, whose records (their leases) are renewed (_renewals).
        self._runs: set[OperationRun] = set()
        self._renew_now = asyncio.Event()
        self._cloudstack_unavailable_since: float | None = None
        self._consumer: Consumer | None = None

    # -- running ------------------------------------------------------------------------------

    async def open(self) -> None:
        ops = await self.bus.bucket(OPERATIONS_BUCKET, OpRecord)
        attaching = await self.bus.bucket(ATTACHING_BUCKET, AttachInFlight)
        self._deps = Deps(
            settings=self.settings,
            cloud=self.cloud,
            devices=self.devices,
            sizes=DeviceSizes(self.bus),
            identity=self.identity,
            records=Records(self.bus, ops, attaching, self.settings.clock),
            owners=VolumeOwners(await self.bus.bucket(VOLUME_OWNERS_BUCKET, VolumeOwner)),
            creates=OtherCreates(self.bus),
            order=VolumeOrder(self.bus, ops, EXECUTOR, self._identify),
            serials=Serials(await self.bus.bucket(SERIALS_BUCKET, SerialsShown)),
            instance=self.instance,
        )
        self._leases = Leases(
            await self.bus.bucket(LEASES_BUCKET, LeaseHolder), self.instance, LEASES_BUCKET.ttl
        )
        self.bus.on_reconnect.append(self._leases.renew_now)  # renewals missed in a blip
        self.bus.on_reconnect.append(self._renew_now.set)  # and the runs' records'

    @property
    def deps(self) -> Deps:
        assert self._deps is not None, "open() first"
        return self._deps

    @property
    def records(self) -> Records:
        return self.deps.records

    @property
    def order(self) -> VolumeOrder:
        return self.deps.order

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
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self.leases.run()),
            asyncio.create_task(self._renewals()),
        ]
        try:
            await self._consumer.run()
        finally:
            for task in background:
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
        return identity_of(op_type, op_id, command)

    async def handle(self, d: Delivery) -> None:
        try:
            op_type = op_type_of(d.subject.rsplit(".", 1)[-1])
        except ValueError as e:
            # Unreachable: the command stream captures one subject per operation type.
            raise Reject(f"not a command subject: {e}") from None
        op_id = self.operation_id_of(d.data, d.headers, d.stream_seq)
        command: Command | None = None
        invalid = ""
        try:
            command = decode_command(op_type, d.data)
        except InvalidCommand as e:
            invalid = str(e)
        identity = identity_of(op_type, op_id, command)
        self.order.note(d.stream_seq, identity)
        if self._inflight.get(op_id) == d.stream_seq:
            raise Abandon(f"{op_id} is still being handled here")
        self._inflight.setdefault(op_id, d.stream_seq)
        try:
            found = await claim(self.deps, d, op_type, identity, command, invalid)
            await self._run(d, op_type, identity, command, found)
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
        """The consumer gives the command up (its last delivery failed, or it was delivered
        more often than ``give_up_after``): its operation ends with it. The one way a
        command is given up. Raising leaves the command for a later delivery, which gives
        it up then (bus/consumer.py)."""
        stored = StoredMessage(d.subject, d.data, d.headers, d.stream_seq)
        log.error("command %d failed for good: %s", d.stream_seq, reason)
        await self._fail_for_good(stored, reason)

    async def _run(
        self,
        d: Delivery,
        op_type: OpType,
        identity: Identity,
        command: Command | None,
        found: Claim,
    ) -> None:
        """The run step: what the claim step found (claim.py) decides what this delivery
        does."""
        op_id = identity.operation_id
        if isinstance(found, Copy):
            # A re-send: answered with the operation's latest event, and acknowledged once
            # the operation has ended (a re-send never ends before its operation).
            if d.num_delivered == 1:
                await self.records.publish_latest(op_id, again=True)
            with d.parked():
                await self.order.ended(op_id)  # (ended: its terminal event is out)
            return
        if isinstance(found, Conflicting):
            await self._reject_copy(d, op_type, identity, command, found)
            return
        if isinstance(found, New):
            run, claimed = found.run, True
        else:
            run, claimed = OperationRun(self.deps, op_id), False
            record = found.record
            log.info(
                "resuming operation %s (%s, status %s, phase %r)",
                op_id,
                record.type,
                record.status,
                record.phase,
            )
            if isinstance(found, Ended):
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
                elif isinstance(command, AttachCommand) or d.num_delivered > 1:
                    # An attach starts before anything else: the correlator counts an
                    # executing attach as in flight (announced first), and its gate is
                    # held from before `executing` (_gate_for). A redelivered command too
                    # (rare: its process died, or a blip outlasted the ack wait): its start
                    # saves ``runs`` before its first CloudStack read, so that a command
                    # whose handling kills its process there counts against give_up_after
                    # (a deferred start would write nothing before the process dies).
                    if isinstance(command, AttachCommand):
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

    async def _reject_copy(
        self,
        d: Delivery,
        op_type: OpType,
        identity: Identity,
        command: Command | None,
        found: Conflicting,
    ) -> None:
        """A later command with an operation id already taken, with another body: rejected
        ``conflict`` at once; it waits for nothing and nothing waits for it."""
        op_id = identity.operation_id
        log.warning(
            "command %d re-uses operation id %s of command %d with another body: rejected",
            d.stream_seq,
            op_id,
            found.original_seq,
        )
        where = f" on volume {found.original_volume}" if found.original_volume else ""
        await self.records.reject_copy(
            op_id,
            op_type,
            d.stream_seq,
            identity.volume_id,
            command.vm_id if isinstance(command, AttachCommand) else None,
            f"operation id {op_id} already names another operation (the command at stream "
            f"sequence {found.original_seq}{where}); this {op_type} command (stream sequence "
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
            or await self.deps.serials.shown(command.vm_id)
        ):
            yield
            return
        with d.parked():
            gate = await self.leases.acquire(f"gate.{command.vm_id}")
        try:
            yield
        finally:
            await self.leases.release(gate)

    async def _fail_for_good(self, stored: StoredMessage, reason: str) -> None:
        """End the command's operation with ``internal`` unless it has ended; either way
        its latest event is published (again) before this returns. A command that failed
        before it could claim its id claims it now, as failed: it ends with one event like
        any other. Only the operation's own command can end it: a copy that could not be
        handled must never fail the operation its first command runs (it waits for it, or
        is rejected ``conflict`` if its body differs). A process still running it keeps its
        lease: then this raises, and the consumer gives the command up again later."""
        identity = self._identify(stored)
        op_id = identity.operation_id
        first = await self.order.first(stored.stream_seq, op_id)
        got = await self.records.ops.get(op_id)
        if first is None and got is not None and got[0].stream_seq != stored.stream_seq:
            first = (got[0].stream_seq, Identity(got[0].volume_id, op_id, record_body(got[0])))
        if first is not None:
            seq, original = first
            if original.body != identity.body:
                op_type = op_type_of(stored.subject.rsplit(".", 1)[-1])
                await self.records.reject_copy(
                    op_id,
                    op_type,
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
        run = OperationRun(self.deps, op_id)
        while True:
            # Once no run holds it (run.py), else TimeoutError: it is tried again later.
            got = await self.records.free(op_id, run.ttl, timeout=1.5 * run.ttl)
            if got is None:
                if await run.claim(self._failed_claim(stored, op_id, reason)):
                    return
                continue  # claimed meanwhile: look again
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
            type=op_type_of(op_type),
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
