"""One operation while an executor process runs it: its record, its lease, its credentials.

``OperationRun`` is what the steps in operations.py see of the executor (their Context): it
saves the record, checks the lease before a mutation, knows which VMs volumed serves, and
ends the operation with exactly one terminal event (through records.py). It is built from
``Deps``, what the executor process shares with every operation (made once, in
``ExecutorActor.open``), and never calls back into the actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from bus.lease import Lease, LeaseLost
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
        self.lease: Lease | None = None  # held while it runs (bus.lease)
        self.clock = self.records.clock

    async def load(self, lease: Lease) -> bool:
        """Under the operation's lease, read its record as it is now: False if it has ended
        (its latest event is then out)."""
        self.lease = lease
        got = await self.records.ops.get(self.operation_id)
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

    async def still_ours(self) -> None:
        got = await self.records.ops.get(self.operation_id)
        if got is None or got[1] != self.revision:
            raise LeaseLost(
                f"the record of {self.operation_id} changed while this process sent a "
                "mutation: another process took it over (it looks the mutation up)"
            )
        self.hold()

    # operations.Context
    async def save(self) -> None:
        self.revision = await self.records.ops.update(self.operation_id, self.record, self.revision)
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
            await self.save()
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

    async def start(self) -> bool:
        """pending → executing, compare-and-set. False if a cancel got there first."""
        while True:
            self.record.status = "executing"
            self.record.last_event = self.event_for(self.record, "executing")
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
        await self._commit()
        self.deps.order.ended_here(self.operation_id)
        if rec.type == "attach":
            await self.records.attaching.delete(self.operation_id)

    async def execute(self, command: Command) -> None:
        try:
            if isinstance(command, CancelCommand):
                cancelled = await cancel(self.deps, command.target, self.operation_id)
                await self.finish(
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
