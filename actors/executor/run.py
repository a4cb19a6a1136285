"""One operation while an executor process runs it: its record, its lease, its credentials.

``OperationRun`` is what the steps in operations.py see of the executor (their Context): it
saves the record, checks the lease before a mutation, knows which VMs volumed serves, and
ends the operation with exactly one terminal event (through records.py). It is built from
``Deps``, what the executor process shares with every operation (made once, in
``ExecutorActor.open``), and never calls back into the actor.

The operation's lease is its record. The write that starts the run (pending → executing,
with its first save) or takes it over names the run in ``holder``, compare-and-set on the
revision it read; every later write of the run is compare-and-set on the revision it wrote
last, so a run whose record another process wrote meanwhile finds out at its next write
(LeaseLost: it touches nothing more). The holder counts on its lease for ``VALID_SHARE`` of
``HOLD_TTL`` after it *sent* its last confirmed write, on its own clock, and checks that
before every CloudStack mutation (``hold``); a run that lasts renews it by writing the
record again (``renew``: every ``HOLD_TTL / RENEWALS_PER_TTL`` seconds without a write, and at
once after a reconnect); a short one never does. Another process takes the operation over
only once it has read the same revision for a whole ``HOLD_TTL`` on its own clock
(Records.free): by then the holder's belief has lapsed, whatever the two hosts' clocks
say. A terminal write, or a run that lets go (``release``), clears ``holder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from actors.executor import operations
from actors.executor.cloudstack import CloudStack, CloudStackError
from actors.executor.identity import LocalIdentity
from actors.executor.operations import (
    Devices,
    OperationFailed,
    OtherCreates,
    Outcome,
    VolumeOwners,
)
from actors.executor.order import VolumeOrder
from actors.executor.records import Records
from actors.executor.resize import DeviceSizes, resize
from actors.executor.serials import Serials
from bus import Conflict
from bus.lease import RENEWALS_PER_TTL, VALID_SHARE, LeaseLost, now
from bus.topology import EXECUTOR
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DetachCommand,
    ResizeCommand,
)
from schemas.common import TERMINAL, Status
from schemas.config import Settings
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import AttachInFlight, CloudStackCredentials, OpRecord


@dataclass(frozen=True)
class Deps:
    """What every operation of one executor process uses, built once when it opens."""

    settings: Settings
    cloud: CloudStack  # without credentials: each operation uses its own (OperationRun.use)
    devices: Devices  # the correlators' hand-offs
    sizes: DeviceSizes  # the watchers' device sizes (resize)
    identity: LocalIdentity  # this host's VM id
    records: Records  # the operations bucket and the events
    owners: VolumeOwners  # which create made each volume
    creates: OtherCreates  # asks persistence which other creates are in doubt
    order: VolumeOrder  # each volume's commands, in stream order
    serials: Serials  # hosts whose devices have shown serials (attach proofs)
    instance: str  # this process (a run's lease names it: OperationRun.holder)


log = logging.getLogger("volumed.executor")

HOLD_TTL = EXECUTOR.ack_wait
"""Seconds a run's record may stay unwritten before another process may take it over: the
command's ack wait, after which the server hands a silent process's command to another."""


class OperationRun:
    """One operation's record and events while the executor works on it."""

    def __init__(self, deps: Deps, operation_id: str) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.cloud = deps.cloud
        self.credentials = CloudStackCredentials()
        self.devices = deps.devices
        self.operation_id = operation_id
        self.record: OpRecord = OpRecord(
            operation_id=operation_id, type="create", status="pending", stream_seq=0
        )
        self.revision = 0
        self.records = deps.records
        # Held from a record change until its event is published (records.py).
        self.lock = self.records.lock_for(operation_id)
        self._attach: AttachInFlight | None = None  # this attach's entry, once written
        self.clock = self.records.clock
        # pending → executing not written yet: it goes with the run's first record write
        # (``defer_start``), and `executing` is published right after that write.
        self._deferred = False
        # The lease (see the module doc): this run's name in ``holder``, when it sent its
        # last write that the server confirmed while it held it, and whether a renewal
        # found the record another's.
        self.holder = f"{deps.instance}/{uuid.uuid4().hex[:12]}"
        self.ttl = HOLD_TTL
        self._confirmed: float | None = None
        self._written: bytes | None = None  # the record as this run's last write stored it
        self._lost = False

    async def load(self) -> bool:
        """Read the record once no other run holds it (Records.free: a holder that stays
        silent for a whole ttl is taken over): False if it has ended (its latest event is
        then out)."""
        got = await self.records.free(self.operation_id, self.ttl)
        if got is None:
            raise RuntimeError(f"the record of {self.operation_id} is gone")
        self.record, self.revision = got
        if self.record.status in TERMINAL:
            await self.settle()
            return False
        return True

    @property
    def holding(self) -> bool:
        """Whether this run's name is in the record as this process last wrote it."""
        return (
            not self._lost
            and self.record.holder == self.holder
            and self.record.status not in TERMINAL
        )

    def hold(self) -> None:
        """Raise LeaseLost unless this run still holds the operation: called just before a
        CloudStack mutation is sent. (Before its deferred start it holds nothing yet, and
        sends nothing: its first write, compare-and-set, claims it.)"""
        if self._deferred:
            return
        if (
            not self.holding
            or self._confirmed is None
            or now() >= self._confirmed + self.ttl * VALID_SHARE
        ):
            raise LeaseLost(f"the record of {self.operation_id} is no longer held by this run")

    def take(self) -> None:
        """This run holds the operation from its next write on (compare-and-set on the
        revision it read: a start, or a takeover)."""
        self.record.holder = self.holder

    async def renew(self, *, now_: bool = False) -> None:
        """Write the record again, as this run last wrote it (nothing of the run's own
        goes with it), if this run holds it and has written nothing for a while (``now_``:
        at once, after a reconnect). Given up before the next renewal is due; a Conflict
        means another process wrote it: the lease is lost."""
        every = self.ttl / RENEWALS_PER_TTL
        if self._deferred or not self.holding or self._written is None:
            return
        if not now_ and self._confirmed is not None and now() - self._confirmed < every:
            return  # a write of the run renewed it
        try:
            async with asyncio.timeout(every), self.lock:
                if self.holding:
                    await self._rewrite(msgspec.json.decode(self._written, type=OpRecord))
        except Conflict:
            self._lost = True
            log.warning("%s was taken over by another process", self.operation_id)
        except Exception as e:
            log.debug("%s not renewed (%s); it stays held for a while", self.operation_id, e)

    async def release(self) -> None:
        """A run that ends without ending its operation lets go of it (the record as it
        last wrote it, ``holder`` cleared), so that its next delivery, here or elsewhere,
        need not wait a ttl; if that cannot be written, it is taken over once the ttl has
        passed."""
        if self._deferred or not self.holding or self._written is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.ttl / RENEWALS_PER_TTL), self.lock:
                if self.holding:
                    record = msgspec.json.decode(self._written, type=OpRecord)
                    record.holder = ""
                    self._lost = True  # (no longer this run's, whatever the answer)
                    await self._rewrite(record)

    async def _rewrite(self, record: OpRecord) -> None:
        """Write ``record`` (what this run last wrote, or that less its holder) on the
        revision of that write: nothing else can have been stored since."""
        sent = now()
        self.revision = await self.records.ops.update(self.operation_id, record, self.revision)
        self._confirmed = sent

    # operations.Context
    async def save(self) -> None:
        """Save the record during the run, compare-and-set on the revision this process
        wrote last. A Conflict means another process wrote it meanwhile (it took the
        operation over while this one was paused, and looks up whatever this one may have
        sent): LeaseLost, this process touches nothing more. That is what detects a
        takeover after a mutation was sent: the next write (its job id, the next phase,
        the terminal write) fails. The first save of a deferred start carries
        pending → executing, and publishes `executing` under the operation's lock."""
        try:
            async with self.lock:  # (a renewal writes too)
                if not self._deferred:
                    await self._write()
                    return
                self._executing()
                await self._write()
                self._deferred = False
                await self.records.publish(self.record)
        except Conflict:
            raise await self._taken() from None

    async def _write(self) -> None:
        """The record's compare-and-set write (Conflict if it moved on); the caller holds
        the lock. Each write of the holder renews its lease."""
        sent = now()
        written = msgspec.json.encode(self.record)  # (for renewals: ``renew``)
        self.revision = await self.records.ops.update(self.operation_id, self.record, self.revision)
        if self.record.holder == self.holder:
            self._confirmed, self._written = sent, written
        started = self.record.attach_started_at
        if self._attach is not None and started and self._attach.started_at is None:
            self._attach.started_at = started  # attachVolume is about to be sent
            await self.records.attaching.put(self.operation_id, self._attach)

    def use(self, credentials: CloudStackCredentials) -> None:
        self.credentials = credentials
        self.cloud = self.deps.cloud.with_credentials(credentials)

    @property
    def owners(self) -> VolumeOwners:
        return self.deps.owners

    @property
    def creates(self) -> OtherCreates:
        return self.deps.creates

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
            vm_id = await self.deps.identity.resolve_vm_id(self.settings.correlation_timeout)
            if vm_id is None:
                raise OperationFailed(
                    "internal",
                    "volumed does not know which VM this host is, so it cannot tell whether "
                    "this attach is to it: set VOLUMED_VM_ID, or oma_vm_id in the active "
                    f"ossea_configs row ({self.deps.identity.vm_id_problem})",
                )
        return vm_id

    def event_for(self, rec: OpRecord, status: Status, **extra: Any) -> OperationEvent:
        return self.records.event_for(rec, status, **extra)

    async def claim(self, record: OpRecord) -> bool:
        """Create the record and publish its first event: False, and nothing done, if the
        id is claimed already (the record then tells by whom)."""
        async with self.lock:
            try:
                self.revision = await self.records.ops.create(self.operation_id, record)
            except Conflict:
                return False
            self.record = record
            try:
                # Only as the subject's first event: else a cancel already published one
                # (or events of an expired record with this id remain): the latest goes out.
                await self.records.publish(record, if_last=0)
                return True
            except Conflict:
                pass
        await self.records.publish_latest(self.operation_id)
        return True

    async def _commit(self) -> None:
        """Save a change of status and publish its event, both under the lock."""
        async with self.lock:
            await self._write()
            await self.records.publish(self.record)

    async def settle(self) -> None:
        """The record is terminal (found so): its latest event goes out before the command is
        acknowledged, and an attach is no longer in flight."""
        record = await self.records.publish_latest(self.operation_id)
        if record is not None and record.type == "attach" and record.status in TERMINAL:
            await self.records.attaching.delete(self.operation_id)

    async def announce_attach(self, command: AttachCommand) -> None:
        """Tell the correlator (the attaching bucket) before the attach turns executing."""
        self._attach = AttachInFlight(
            operation_id=self.operation_id,
            volume_id=command.volume_id,
            vm_id=command.vm_id,
            accepted_at=self.record.accepted_at,
            clock=self.clock,
        )
        await self.records.attaching.put(self.operation_id, self._attach)

    def defer_start(self) -> None:
        """pending → executing with the run's first record write (its "mutation sent" before
        the first CloudStack mutation, or its terminal write if it ends before any): one
        write fewer per operation. Nothing is sent to CloudStack before that write, so a
        cancel that wins meanwhile (pending → cancelled) makes the write fail, and the run
        stops having sent nothing (``Ended``). Runs started so are counted in ``runs`` with
        that write."""
        self._deferred = True

    async def _taken(self) -> LeaseLost:
        """What a run's record write that met a Conflict means: Ended, for a deferred start
        that a cancel (or the give-up path) ended first; else LeaseLost (another process
        wrote the record: it took the operation over)."""
        got = await self.records.ops.get(self.operation_id)
        if self._deferred and got is not None and got[0].status in TERMINAL:
            self.record, self.revision = got
            return Ended(f"{self.operation_id} ended ({got[0].status}) before it started")
        self._lost = True
        return LeaseLost(
            f"the record of {self.operation_id} changed under this process: another "
            "process took the operation over (it looks up whatever was sent)"
        )

    def _executing(self) -> None:
        """The record as its start writes it (``start``, or a deferred start's first save):
        executing, with its event, held by this run."""
        self.record.status = "executing"
        self.record.last_event = self.event_for(self.record, "executing")
        self.take()

    async def start(self) -> bool:
        """pending → executing, compare-and-set. False if a cancel got there first."""
        while True:
            self._executing()
            try:
                await self._commit()
                return True
            except Conflict:
                got = await self.records.ops.get(self.operation_id)
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
        rec.holder = ""  # the terminal write ends the lease
        if self._deferred:
            # Ended before any other write: the record goes pending → terminal in one
            # write, and both events follow it in order. A crash between the two publishes
            # is repaired by whoever publishes the latest event (records.py).
            async with self.lock:
                await self._write()
                self._deferred = False
                await self.records.publish_event(self.event_for(rec, "executing"))
                await self.records.publish(rec)
        else:
            await self._commit()
        self.deps.order.ended_here(self.operation_id)
        if rec.type == "attach":
            await self.records.attaching.delete(self.operation_id)

    async def execute(self, command: Command) -> None:
        """Run the command and end its operation with exactly one terminal event. During
        the run, the record is this process's: a write that finds it changed stops it
        (LeaseLost), or, before it started, finds it ended (Ended: its event goes out)."""
        try:
            await self._execute(command)
        except Ended:
            await self.settle()

    async def _finish_run(self, status: Status, **kwargs: Any) -> None:
        """``finish`` during the run (a Conflict means what ``_taken`` says)."""
        try:
            await self.finish(status, **kwargs)
        except Conflict:
            raise await self._taken() from None

    async def _execute(self, command: Command) -> None:
        try:
            if isinstance(command, CancelCommand):
                cancelled = await cancel(self.deps, command.target, self.operation_id)
                await self._finish_run(
                    "completed",
                    target=command.target,
                    outcome=Outcome(response={"cancelled": cancelled.operation_id}),
                )
                return
            outcome = await _dispatch(self, command)
            if outcome.proof is not None and outcome.vm_id is not None:
                # How the attach's device was proven: it opens (or closes) the host's gate.
                await self.deps.serials.note(outcome.vm_id, outcome.proof, self.operation_id)
        except OperationFailed as e:
            self.record.volume_id = e.volume_id or self.record.volume_id
            self.record.vm_id = e.vm_id or self.record.vm_id
            await self._finish_run(
                "failed",
                error=ErrorInfo(code=e.code, message=e.message),
                target=getattr(command, "target", None),
                attached=e.attached,
            )
            return
        except CloudStackError as e:
            await self._finish_run("failed", error=ErrorInfo(code=e.code, message=e.message))
            return
        await self._finish_run("completed", outcome=outcome)


class Ended(LeaseLost):
    """The operation ended (cancelled, given up) before this run's deferred start was
    written: nothing was sent; its latest event goes out and the command is done. (A
    LeaseLost, so that wherever it is not caught the run touches nothing more.)"""


async def _dispatch(run: OperationRun, command: Command) -> Outcome:
    if isinstance(command, CreateCommand):
        return await operations.create(run, command)
    if isinstance(command, AttachCommand):
        return await operations.attach(run, command)
    if isinstance(command, DetachCommand):
        return await operations.detach(run, command)
    if isinstance(command, DeleteCommand):
        return await operations.delete(run, command)
    if isinstance(command, ResizeCommand):
        return await resize(run, command, run.deps.sizes)
    raise OperationFailed("internal", f"no executor for {type(command).__name__}")


async def cancel(deps: Deps, target_id: str, by: str) -> OperationEvent:
    """Cancel ``target_id`` if it has not started; return the target's cancelled event.

    The cancelled event names the cancel ``by`` (its ``target``: the operation that
    caused it), so that the cancel, resumed after a crash between the two, finds its
    own work done instead of failing with not_cancellable."""
    for _ in range(20):
        got = await deps.records.ops.get(target_id)
        if got is None:
            raise OperationFailed("not_found", f"no operation {target_id} is known")
        target, revision = got
        done = target.last_event
        if target.status == "cancelled" and done is not None and done.target == by:
            # This cancel, resumed: its work is done, but the target's event may not be
            # out (its publish failed, or the process died before it).
            await OperationRun(deps, target_id).settle()
            return done
        if target.status != "pending":
            what = "is executing" if target.status == "executing" else f"is {target.status}"
            raise OperationFailed(
                "not_cancellable",
                f"operation {target_id} {what}; it can no longer be cancelled",
            )
        run = OperationRun(deps, target_id)
        run.record, run.revision = target, revision
        try:
            await run.finish("cancelled", target=by)
        except Conflict:
            continue  # it moved meanwhile: look again
        assert target.last_event is not None
        return target.last_event
    raise OperationFailed("internal", f"operation {target_id} kept changing; try again")
