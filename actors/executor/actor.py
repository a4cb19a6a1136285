"""The executor: takes volume commands from the command stream and carries them out.

Any number of executor processes share the command stream. For each command message:
1. Work out its operation id (body, else Nats-Msg-Id, else one derived from the message).
2. Claim the id in the operations bucket (KV create) and publish `pending` (or `rejected`
   for an invalid command). A claim that exists is a re-sent command (another stream
   sequence: publish its latest event again, then wait until the operation has ended) or a
   redelivery of this very message (same sequence: resume it from its record).
3. Wait for the volume's turn (order.py): every earlier command on the volume is done,
   whichever process ran it.
4. Take the operation's lease (bus.lease): it runs in one process at a time, and a dead
   process's operation is taken over only once its lease has expired. Before every
   CloudStack mutation the lease is checked; a process that lost it stops (Abandon).
5. Move the record pending → executing compare-and-set (a cancel may have won), publish
   `executing`, run the operation (operations.py), publish exactly one terminal event.
The message is acknowledged only when the operation is terminal and its record's latest event
was published (bus/consumer.py makes every ack decision from the handler's outcome); until
then the consumer heartbeats it, so a crash hands it to another executor, which resumes from
the record, looking up in CloudStack whatever may have been sent, never sending it blind.

Events of one operation never go backwards: each record change and the publish of its event
hold the operation's lock (in this process), and every publish that is not the record's own
next step (a re-sent command, a resumed one) is publish-if-last on the events stream: read the
subject's last sequence, then the record, then publish only if nothing came in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from actors.executor import operations
from actors.executor.cloudstack import CloudStack, CloudStackError
from actors.executor.devices import BusDevices
from actors.executor.operations import (
    CreatesInFlight,
    Devices,
    OperationFailed,
    Outcome,
    VolumeOwners,
    attachment_after,
)
from actors.executor.order import VolumeOrder
from actors.logs import SECRETS
from bus import Abandon, Bucket, Bus, Conflict, Consumer, Delivery, Reject
from bus.connection import StoredMessage, encode
from bus.consumer import dead_letter
from bus.lease import Lease, LeaseLost, Leases
from bus.topology import (
    ATTACHING_BUCKET,
    COMMANDS,
    CONFIG_SUBJECT,
    EVENTS,
    EXECUTOR,
    EXECUTOR_GIVEN_UP,
    HEALTH_BUCKET,
    LEASES_BUCKET,
    OPERATIONS_BUCKET,
    VOLUME_OWNERS_BUCKET,
    event_subject,
)
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DetachCommand,
    InvalidCommand,
    decode_command,
    operation_id_in,
    request_of,
    volume_of,
)
from schemas.common import TERMINAL, OpType, Status, is_operation_id, now_rfc3339
from schemas.config import Settings, url_secrets
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import (
    AttachInFlight,
    CheckResult,
    CloudStackCredentials,
    GivenUpAdvisory,
    Heartbeat,
    LeaseHolder,
    OpRecord,
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
        self.cloud = cloud or CloudStack(self._credentials, timeout=settings.cloudstack_timeout)
        self.devices: Devices = devices or BusDevices(bus)
        self._inflight: dict[str, int] = {}  # operation id → stream sequence being handled
        self._serials_proven = False
        self._ops: Bucket[OpRecord] | None = None
        self._owners: VolumeOwners | None = None
        self._order: VolumeOrder | None = None
        self._leases: Leases | None = None
        # Operations running at once (past their turn and lease); the consumer takes more
        # commands than that, so that commands waiting for their turn or a lease never keep
        # the one they wait for from being delivered.
        self._working = asyncio.Semaphore(settings.executor_concurrency)
        self.creates = CreatesInFlight()
        self.clock = settings.clock
        # The local VM id as last resolved (settings, else ossea_configs.oma_vm_id), and why
        # it is unknown while it is; since when CloudStack has been unavailable.
        self._vm_id: str | None = settings.vm_id
        self.vm_id_problem = ""
        self._cloudstack_unavailable_since: float | None = None
        self._attaching: Bucket[AttachInFlight] | None = None
        # One lock per operation id while anything here works on it (see the module doc).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Ids whose "latest event again" waits for the lock.
        self._queued_again: dict[str, object] = {}
        self._consumer: Consumer | None = None
        self._given_up: Consumer | None = None

    # -- running ------------------------------------------------------------------------------

    async def open(self) -> None:
        self._ops = await self.bus.bucket(OPERATIONS_BUCKET, OpRecord)
        self._owners = VolumeOwners(await self.bus.bucket(VOLUME_OWNERS_BUCKET, VolumeOwner))
        self._attaching = await self.bus.bucket(ATTACHING_BUCKET, AttachInFlight)
        self._order = VolumeOrder(self.bus, self._ops, EXECUTOR, self._identify)
        self._leases = Leases(
            await self.bus.bucket(LEASES_BUCKET, LeaseHolder), self.instance, LEASES_BUCKET.ttl
        )

    @property
    def owners(self) -> VolumeOwners:
        assert self._owners is not None, "open() first"
        return self._owners

    @property
    def order(self) -> VolumeOrder:
        assert self._order is not None, "open() first"
        return self._order

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
            concurrency=4 * self.settings.executor_concurrency,
            on_give_up=self.give_up,
        )
        self._given_up = Consumer(self.bus, EXECUTOR_GIVEN_UP, self.given_up, concurrency=4)
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self.leases.run()),
            asyncio.create_task(self._given_up.run()),
        ]
        try:
            await self._consumer.run()
        finally:
            self._given_up.stop()
            await asyncio.wait(background[2:], timeout=5)
            for task in background:
                task.cancel()
            self.order.close()
            await self.cloud.close()

    def stop(self) -> None:
        if self._consumer:
            self._consumer.stop()
        if self._given_up:
            self._given_up.stop()

    # -- credentials and identity ---------------------------------------------------------------

    async def _credentials(self) -> CloudStackCredentials:
        """The credentials (environment, else the active ossea_configs row) and the local
        VM id (VOLUMED_VM_ID, else the row's oma_vm_id, whatever the credentials' source)."""
        s = self.settings
        from_env = bool(s.cloudstack_endpoint and s.cloudstack_key and s.cloudstack_secret)
        if from_env and s.vm_id:
            return CloudStackCredentials(
                endpoint=s.cloudstack_endpoint,
                key=s.cloudstack_key,
                secret=s.cloudstack_secret,
                vm_id=s.vm_id,
            )
        try:
            data = await self.bus.request(CONFIG_SUBJECT, b"{}", timeout=5.0)
            creds = msgspec.json.decode(data, type=CloudStackCredentials)
        except Exception as e:
            creds = CloudStackCredentials(
                error=f"the persistence actor did not answer for ossea_configs ({type(e).__name__})"
            )
        row_error, creds.error = creds.error, None if from_env else creds.error
        # Environment values win over the row, key by key.
        creds.endpoint = s.cloudstack_endpoint or creds.endpoint
        creds.key = s.cloudstack_key or creds.key
        creds.secret = s.cloudstack_secret or creds.secret
        creds.vm_id = s.vm_id or creds.vm_id
        # The row's endpoint may carry a password too (http://user:password@host/...).
        SECRETS.add(creds.secret, *url_secrets(creds.endpoint or ""))
        self._vm_id = creds.vm_id
        self.vm_id_problem = (
            ""
            if creds.vm_id
            else "VOLUMED_VM_ID is unset and "
            + (row_error or "the active ossea_configs row has no oma_vm_id")
        )
        return creds

    async def resolve_local_vm_id(self, wait: float) -> str | None:
        """The local VM id, asking ossea_configs again for up to ``wait`` seconds while it
        is unknown."""
        deadline = time.monotonic() + wait
        while self._vm_id is None and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
            await self._credentials()
        return self._vm_id

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

    def _identify(self, stored: StoredMessage) -> tuple[str | None, str]:
        """A command's volume (None if it names none or is invalid) and operation id."""
        op_id = self.operation_id_of(stored.data, stored.headers, stored.stream_seq)
        try:
            command = decode_command(stored.subject.rsplit(".", 1)[-1], stored.data)
        except InvalidCommand:
            return None, op_id
        return volume_of(command), op_id

    async def handle(self, d: Delivery) -> None:
        op_type = d.subject.rsplit(".", 1)[-1]
        op_id = self.operation_id_of(d.data, d.headers, d.stream_seq)
        command: Command | None = None
        invalid = ""
        try:
            command = decode_command(op_type, d.data)
        except InvalidCommand as e:
            invalid = str(e)
        self.order.note(d.stream_seq, volume_of(command) if command else None, op_id)
        if self._inflight.get(op_id) == d.stream_seq:
            raise Abandon(f"{op_id} is still being handled here")
        self._inflight.setdefault(op_id, d.stream_seq)
        try:
            await self._process(d, op_type, op_id, command, invalid)
        except LeaseLost as e:
            # Another process may be running it now: touch nothing, answer nothing.
            raise Abandon(f"{op_id}: {e}") from None
        finally:
            if self._inflight.get(op_id) == d.stream_seq:
                del self._inflight[op_id]

    async def give_up(self, d: Delivery, reason: str) -> None:
        """The consumer gives the command up (its last delivery failed): its operation ends
        with it. Raising leaves the command to the server, which gives it up in turn; the
        given-up path ends it then (also after a restart)."""
        op_id = self.operation_id_of(d.data, d.headers, d.stream_seq)
        log.error("operation %s failed for good: %s", op_id, reason)
        await self._fail_for_good(op_id, reason, d.stream_seq)

    async def _process(
        self, d: Delivery, op_type: str, op_id: str, command: Command | None, invalid: str
    ) -> None:
        assert self._ops is not None
        run = OperationRun(self, op_id)
        record = OpRecord(
            operation_id=op_id,
            type=_op_type(op_type),
            status="rejected" if invalid else "pending",
            stream_seq=d.stream_seq,
            command=d.data if command else b"",
            volume_id=volume_of(command) if command else None,
            vm_id=command.vm_id if isinstance(command, AttachCommand) else None,
            accepted_at=now_rfc3339(),
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
        except Conflict:
            got = await self._ops.get(op_id)
            if got is None:  # deleted in between: treat as new next time
                raise
            existing = got[0]
            if existing.stream_seq != d.stream_seq:
                # The same operation id again: nothing new, only its latest event again;
                # and this command is not acknowledged before its operation has ended.
                if d.num_delivered == 1:
                    await self.publish_latest(op_id, again=True)
                await self.order.ended(op_id)
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
            await self.publish_latest(op_id)
        if command is None:
            return  # rejected: its one event is out
        volume = volume_of(command)
        if volume is not None:
            await self.order.turn(volume, d.stream_seq)
        async with self.leases.holding(f"op.{op_id}") as lease:
            # Read again: another process may have run it meanwhile (and lost its lease).
            if not await run.load(lease):
                return  # it ended meanwhile: its latest event is out
            # Credentials (and the local VM id) are read once per operation, when its turn
            # comes: a changed ossea_configs row applies to the next operation, never to half
            # of one.
            run.use(await self._credentials())
            async with self._gate_for(command, run), self._working:
                if run.record.status == "pending":
                    if isinstance(command, AttachCommand):
                        await run.announce_attach(command)
                    if not await run.start():
                        if run.record.status not in TERMINAL:
                            raise Abandon(f"{op_id} was started elsewhere")
                        await run.settle()  # cancelled while it waited
                        return
                await run.execute(command)

    async def publish_latest(self, op_id: str, *, again: bool = False) -> OpRecord | None:
        """Publish the operation's latest event (its record's), never an older one.

        Publish-if-last, so that it holds across processes too: the subject's last sequence
        is read before the record, and the publish is refused if anything was published on
        the subject in between (then both are read again). ``again``: publish it even if it
        is the last one stored (a re-sent command asks for it); else only if it is not."""
        assert self._ops is not None
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
        assert self._ops is not None
        subject = event_subject(op_id)
        for _ in range(20):
            last = await self.bus.last_stored(EVENTS.name, subject)
            got = await self._ops.get(op_id)
            record = got[0] if got is not None else None
            event = record.last_event if record is not None else None
            if event is None:
                return record
            if not again and last is not None and last.data == encode(event):
                return record  # it is out already
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

    def lock_for(self, op_id: str) -> asyncio.Lock:
        lock = self._locks.get(op_id)
        if lock is None:
            lock = self._locks[op_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _gate_for(self, command: Command, run: OperationRun) -> AsyncIterator[None]:
        """Until a host has shown that its devices carry serials, attaches to it start one
        at a time, whichever executor process runs them (the host's gate lease): its
        correlator can then prove a serial-less device is the volume of the only attach in
        flight. The gate is taken before the operation turns `executing`, which is what the
        correlator counts as in flight (and a waiting attach can still be cancelled).
        Losing the gate is safe: the correlator then sees two attaches in flight and proves
        neither device by exclusion."""
        if (
            not isinstance(command, AttachCommand)
            or self._serials_proven
            # Not served, and not this host's (if that is unknown, it may be: gated).
            or not (await run.serves(command.vm_id) or await run.local_vm_id() is None)
        ):
            yield
            return
        async with self.leases.holding(f"gate.{command.vm_id}"):
            yield

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
        if op_id in self._inflight:
            return  # still being worked on here: it ends by itself
        assert self._ops is not None
        if await self._ops.get(op_id) is None:
            return  # never accepted: nothing to end, nothing to report
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
        await self._fail_for_good(op_id, reason, stored.stream_seq)

    async def _fail_for_good(self, op_id: str, reason: str, stream_seq: int) -> None:
        """End the operation with ``internal`` unless it has ended; either way its latest
        event is published (again) before this returns. Only the operation's own command
        (``stream_seq``) can end it: a re-sent copy that could not be handled must never
        fail the operation the original is still running. A process still running it
        keeps its lease: then this raises, and the given-up path tries again later."""
        async with self.leases.holding(f"op.{op_id}", timeout=1.5 * self.leases.ttl):
            await self._fail_unless_ended(op_id, reason, stream_seq)

    async def _fail_unless_ended(self, op_id: str, reason: str, stream_seq: int) -> None:
        assert self._ops is not None
        run = OperationRun(self, op_id)
        while (got := await self._ops.get(op_id)) is not None:
            run.record, run.revision = got
            if run.record.stream_seq != stream_seq:
                await self.publish_latest(op_id)
                return
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

    # -- cancel --------------------------------------------------------------------------------

    async def cancel(self, target_id: str, by: str) -> OperationEvent:
        """Cancel ``target_id`` if it has not started; return the target's cancelled event.

        The cancelled event names the cancel ``by`` (its ``target``: the operation that
        caused it), so that the cancel, resumed after a crash between the two, finds its
        own work done instead of failing with not_cancellable."""
        assert self._ops is not None
        for _ in range(20):
            got = await self._ops.get(target_id)
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
        bucket = await self.bus.bucket(HEALTH_BUCKET, Heartbeat)
        while True:
            check = await self.probe_cloudstack()
            try:
                await bucket.put(
                    f"executor.{self.instance}",
                    Heartbeat(
                        actor="executor",
                        instance=self.instance,
                        at=time.time(),
                        checks={"cloudstack": check, "local_vm": self.local_vm_check()},
                    ),
                )
            except Exception as e:
                log.debug("heartbeat not stored: %s", e)
            await asyncio.sleep(self.settings.heartbeat_interval)

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

    def local_vm_check(self) -> CheckResult:
        """Which VM this host is: attaches to it need the id to find their devices."""
        if self._vm_id is None:
            return CheckResult(
                status="down",
                detail=f"unknown, attaches wait for it and then fail: {self.vm_id_problem}",
            )
        source = "VOLUMED_VM_ID" if self.settings.vm_id else "ossea_configs.oma_vm_id"
        return CheckResult(status="ok", detail=f"{self._vm_id} ({source})")

    # -- for operations ------------------------------------------------------------------------

    def note_proof(self, proof: str) -> None:
        self._serials_proven = proof == "serial"


class OperationRun:
    """One operation's record and events while the executor works on it."""

    def __init__(self, executor: ExecutorActor, operation_id: str) -> None:
        self.executor = executor
        self.settings = executor.settings
        self.cloud = executor.cloud
        self.credentials = CloudStackCredentials()
        self.devices = executor.devices
        self.operation_id = operation_id
        self.record: OpRecord = OpRecord(
            operation_id=operation_id, type="create", status="pending", stream_seq=0
        )
        self.revision = 0
        # Held from a record change until its event is published (see the module doc).
        self.lock = executor.lock_for(operation_id)
        self._attach: AttachInFlight | None = None  # this attach's entry, once written
        self.lease: Lease | None = None  # held while it runs (bus.lease)
        self.clock = executor.clock

    async def load(self, lease: Lease) -> bool:
        """Under the operation's lease, read its record as it is now: False if it has ended
        (its latest event is then out)."""
        assert self.executor._ops is not None
        self.lease = lease
        got = await self.executor._ops.get(self.operation_id)
        if got is None:
            raise RuntimeError(f"the record of {self.operation_id} is gone")
        self.record, self.revision = got
        if self.record.status in TERMINAL:
            await self.settle()
            return False
        return True

    def hold(self) -> None:
        """Raise LeaseLost unless this process still holds the operation's lease: called
        just before a CloudStack mutation is sent."""
        if self.lease is not None:
            self.lease.check()

    # Context protocol for operations.py
    async def save(self) -> None:
        assert self.executor._ops is not None
        self.revision = await self.executor._ops.update(
            self.operation_id, self.record, self.revision
        )
        started = self.record.attach_started_at
        if self._attach is not None and started and self._attach.started_at is None:
            self._attach.started_at = started  # attachVolume is about to be sent
            await self._attaching().put(self.operation_id, self._attach)

    def use(self, credentials: CloudStackCredentials) -> None:
        self.credentials = credentials
        self.cloud = self.executor.cloud.with_credentials(credentials)

    @property
    def owners(self) -> VolumeOwners:
        return self.executor.owners

    @property
    def creates(self) -> CreatesInFlight:
        return self.executor.creates

    async def serves(self, vm_id: str, *, wait: bool = False) -> bool:
        """Whether volumed proves the devices of VM ``vm_id``: a correlator serves it (on
        whichever host), or it is this host's VM. Where this host's VM is unknown, it may
        be it: with ``wait``, wait a bounded time for it and fail if it stays unknown;
        without, it counts as not served."""
        if await self.devices.serves(vm_id):
            return True
        return vm_id == await self.local_vm_id(wait=wait)

    async def local_vm_id(self, *, wait: bool = False) -> str | None:
        vm_id = self.settings.vm_id or self.credentials.vm_id
        if vm_id is None and wait:
            # An attach must not silently become an attach to another VM (no device).
            vm_id = await self.executor.resolve_local_vm_id(self.settings.correlation_timeout)
            if vm_id is None:
                raise OperationFailed(
                    "internal",
                    "volumed does not know which VM this host is, so it cannot tell whether "
                    "this attach is to it: set VOLUMED_VM_ID, or oma_vm_id in the active "
                    f"ossea_configs row ({self.executor.vm_id_problem})",
                )
        return vm_id

    def note_proof(self, proof: str) -> None:
        self.executor.note_proof(proof)

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
            clock=self.clock,
            **extra,
        )

    async def claim(self, record: OpRecord) -> None:
        """Create the record (Conflict if the id is known) and publish its first event."""
        assert self.executor._ops is not None
        async with self.lock:
            self.revision = await self.executor._ops.create(self.operation_id, record)
            self.record = record
            try:
                # Only as the subject's first event: else a cancel already published one
                # (or events of an expired record with this id remain): the latest goes out.
                await self._publish(if_last=0)
                return
            except Conflict:
                pass
        await self.executor.publish_latest(self.operation_id)

    async def _commit(self) -> None:
        """Save a change of status and publish its event, both under the lock."""
        async with self.lock:
            await self.save()
            await self._publish()

    async def _publish(self, if_last: int | None = None) -> None:
        event = self.record.last_event
        if event is not None:
            await self.executor.bus.publish(
                event_subject(self.operation_id),
                event,
                msg_id=event_msg_id(event),
                if_last=if_last,
            )

    async def settle(self) -> None:
        """The record is terminal (found so): its latest event goes out before the command is
        acknowledged, and an attach is no longer in flight."""
        record = await self.executor.publish_latest(self.operation_id)
        if record is not None and record.type == "attach" and record.status in TERMINAL:
            await self._attaching().delete(self.operation_id)

    async def announce_attach(self, command: AttachCommand) -> None:
        """Tell the correlator (the attaching bucket) before the attach turns executing."""
        self._attach = AttachInFlight(
            operation_id=self.operation_id,
            volume_id=command.volume_id,
            vm_id=command.vm_id,
            accepted_at=self.record.accepted_at,
            clock=self.clock,
        )
        await self._attaching().put(self.operation_id, self._attach)

    def _attaching(self) -> Bucket[AttachInFlight]:
        assert self.executor._attaching is not None
        return self.executor._attaching

    async def start(self) -> bool:
        """pending → executing, compare-and-set. False if a cancel got there first."""
        assert self.executor._ops is not None
        while True:
            self.record.status = "executing"
            self.record.last_event = self.event_for(self.record, "executing")
            try:
                await self._commit()
                return True
            except Conflict:
                got = await self.executor._ops.get(self.operation_id)
                if got is None:
                    return False
                self.record, self.revision = got
                if self.record.status != "pending":
                    return False

    async def finish(
        self,
        status: Status,
        *,
        error: ErrorInfo | None = None,
        outcome: Outcome | None = None,
        target: str | None = None,
        attached: bool | None = None,
    ) -> None:
        rec = self.record
        extra: dict[str, Any] = {"error": error, "target": target, "attached": attached}
        if outcome is not None:
            rec.volume_id = outcome.volume_id or rec.volume_id
            rec.vm_id = outcome.vm_id or rec.vm_id
            extra |= {
                "device_path": outcome.device_path,
                "by_id_path": outcome.by_id_path,
                "size": outcome.size,
                "response": outcome.response or None,
                "attached": outcome.attached,
            }
        rec.status = status
        rec.last_event = self.event_for(rec, status, **extra)
        await self._commit()
        self.executor.order.ended_here(self.operation_id)
        if rec.type == "attach":
            await self._attaching().delete(self.operation_id)

    async def execute(self, command: Command) -> None:
        try:
            if isinstance(command, CancelCommand):
                cancelled = await self.executor.cancel(command.target, self.operation_id)
                await self.finish(
                    "completed",
                    target=command.target,
                    outcome=Outcome(response={"cancelled": cancelled.operation_id}),
                )
                return
            outcome = await _dispatch(self, command)
        except OperationFailed as e:
            self.record.volume_id = e.volume_id or self.record.volume_id
            self.record.vm_id = e.vm_id or self.record.vm_id
            await self.finish(
                "failed",
                error=ErrorInfo(code=e.code, message=e.message),
                target=getattr(command, "target", None),
                attached=e.attached,
            )
            return
        except CloudStackError as e:
            await self.finish("failed", error=ErrorInfo(code=e.code, message=e.message))
            return
        await self.finish("completed", outcome=outcome)


async def _dispatch(run: OperationRun, command: Command) -> Outcome:
    if isinstance(command, CreateCommand):
        return await operations.create(run, command)
    if isinstance(command, AttachCommand):
        return await operations.attach(run, command)
    if isinstance(command, DetachCommand):
        return await operations.detach(run, command)
    if isinstance(command, DeleteCommand):
        return await operations.delete(run, command)
    raise OperationFailed("internal", f"no executor for {type(command).__name__}")


def _op_type(name: str) -> OpType:
    allowed: tuple[OpType, ...] = ("create", "attach", "detach", "delete", "cancel")
    for t in allowed:
        if t == name:
            return t
    return "create"  # unreachable: the stream only captures the five command subjects


def event_msg_id(event: OperationEvent) -> str:
    """JetStream drops a second copy of one step's event published within its dedupe window
    (a step published again after a restart)."""
    return f"{event.operation_id}:{event.status}"
