"""What each command does in CloudStack, safe to resume and never sending a mutation twice.

Rule for every mutation: the record says "mutation sent" before it goes out, and the job id
as soon as it is known. If the answer is lost or the process restarts, the operation looks
the job or the volume up before it considers sending anything again
(apache/cloudstack#14214: a second detach can undo a newer attach).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec

from actors.executor.cloudstack import CloudStack, CloudStackError, Job
from actors.executor.errors import OperationError
from actors.logs import bind
from actors.metrics import RETRIES, RETRIES_EXHAUSTED
from bus import Bucket, Bus, Conflict
from bus.topology import CREATES_SUBJECT
from schemas.commands import AttachCommand, CreateCommand, DeleteCommand, DetachCommand
from schemas.common import GIB, ErrorCode, epoch_of, serial_of
from schemas.config import Settings
from schemas.events import ErrorInfo
from schemas.internal import (
    CorrelateRequest,
    CorrelateResult,
    CreatesInDoubt,
    CreatesQuery,
    OpRecord,
    Phase,
    ReleaseRequest,
    VolumeOwner,
)

log = logging.getLogger("volumed.executor")
T = TypeVar("T")

# A create whose answer was lost is recognised by its exact name among the volumes created
# around the time it was sent, both read on CloudStack's clock (learned from its answers);
# this much apart at most (a slow request, the learned clock's 1 s resolution).
CREATE_LOOKUP_SKEW = 300.0


class OperationFailed(OperationError):
    """An operation failed for a reason of its own (not a CloudStack call's error), with
    where it left the volume."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        volume_id: str | None = None,
        vm_id: str | None = None,
        attached: bool | None = None,
    ) -> None:
        super().__init__(code, message)
        self.volume_id = volume_id
        self.vm_id = vm_id
        # The volume's attachment to vm_id after this failed operation, when the operation
        # changed it (OperationEvent.attached); None: unchanged or unknown.
        self.attached = attached


@dataclass
class Outcome:
    volume_id: str | None = None
    vm_id: str | None = None
    device_path: str | None = None
    by_id_path: str | None = None
    size: int | None = None
    response: dict[str, Any] = field(default_factory=dict)
    attached: bool | None = None  # OperationEvent.attached
    # An attach whose device was proven: how ("serial", else by exclusion). The run notes
    # it for the host (Serials), which opens or closes its serial-less attach gate.
    proof: str | None = None


class Devices(Protocol):
    """The correlator, as the executor sees it."""

    async def correlate(self, request: CorrelateRequest, timeout: float) -> CorrelateResult: ...

    async def release(
        self, request: ReleaseRequest, vm_id: str, timeout: float
    ) -> tuple[bool, str]: ...

    async def device_of(self, volume_id: str) -> str | None: ...

    async def serves(self, vm_id: str) -> bool:
        """Whether a correlator (on any host) takes the hand-offs of VM ``vm_id``."""
        ...


class VolumeOwners:
    """Which create made each volume (the volume owners bucket). Creating the key is the
    claim, so of two operations that want one volume exactly one gets it."""

    def __init__(self, bucket: Bucket[VolumeOwner]) -> None:
        self._bucket = bucket

    async def claim(self, volume_id: str, operation_id: str) -> str | None:
        """Claim the volume for ``operation_id``; None when it holds the volume now, else
        the operation that holds it."""
        for _ in range(3):
            try:
                await self._bucket.create(
                    volume_id, VolumeOwner(operation_id=operation_id, at=time.time())
                )
                return None
            except Conflict:
                holder = await self.owner(volume_id)
                if holder is not None:
                    return None if holder == operation_id else holder
                # Expired or removed in between: claim again.
        raise OperationFailed(
            "internal", f"the claim of volume {volume_id} kept changing; try again"
        )

    async def owner(self, volume_id: str) -> str | None:
        got = await self._bucket.get(volume_id)
        return got[0].operation_id if got is not None else None


CreateKey = tuple[str, int, str, str]  # name, size in bytes, zone, disk offering

# How long the look-up of a create whose answer was lost waits for persistence's answer (it
# waits up to actors.persistence.actor.CREATES_WAIT for the database), and how often it
# looks again while other creates are in doubt.
CREATES_ASK_TIMEOUT = 15.0
CREATES_POLL = 0.5


class CannotTell(Exception):
    """Whether other creates are in doubt is unknown now (persistence away or behind)."""


class OtherCreates:
    """The other creates, in any executor process, that may have made a volume they have not
    claimed yet. A create whose answer was lost may find a volume of another create of the
    same name, size, zone and offering that has sent createVolume but not claimed its volume
    yet: such a volume must not be adopted before that create has settled.

    Asked of persistence, only on that rare path, so that a create's normal path writes
    nothing for it: every create stored its ``executing`` event before it sent createVolume,
    so once the database holds every event published before the question (the query's
    read-after wait, else an error) it knows each create that may have sent one and has not
    ended, or failed without naming a volume. A create that holds a volume already is told
    apart by the asker, from the volume owners bucket."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def in_doubt(self, key: CreateKey, operation_id: str) -> list[str]:
        """Other creates with these parameters that may have made a volume (those holding
        one included); CannotTell when persistence cannot say."""
        name, size, zone_id, offering = key
        query = CreatesQuery(
            operation_id=operation_id,
            name=name,
            size=size,
            zone_id=zone_id,
            disk_offering_id=offering,
        )
        try:
            data = await self._bus.request(CREATES_SUBJECT, query, timeout=CREATES_ASK_TIMEOUT)
            answer = msgspec.json.decode(data, type=CreatesInDoubt)
        except Exception as e:
            raise CannotTell(
                f"persistence did not answer ({type(e).__name__}: {e})"
                if str(e)
                else f"persistence did not answer ({type(e).__name__})"
            ) from None
        if answer.error:
            raise CannotTell(answer.error)
        return answer.operations


class Context(Protocol):
    """What an operation needs from the executor around it."""

    settings: Settings
    cloud: CloudStack
    devices: Devices
    record: OpRecord
    clock: str  # Settings.clock: whose clock this process's times are on

    @property
    def owners(self) -> VolumeOwners: ...

    @property
    def creates(self) -> OtherCreates: ...

    async def save(self) -> None:
        """Save the record compare-and-set; raise bus.lease.LeaseLost if another process
        changed it meanwhile (it took the operation over: it looks up whatever this one
        sent before sending it again, and this process must stop)."""
        ...

    async def local_vm_id(self, *, wait: bool = False) -> str | None:
        """The VM this host is; with ``wait``, waits a bounded time for it to be known and
        fails the operation if it is not."""
        ...

    async def serves(self, vm_id: str, *, wait: bool = False) -> bool:
        """Whether volumed proves VM ``vm_id``'s devices (a correlator serves it, on any
        host, or it is this host's VM); ``wait`` as for local_vm_id."""
        ...

    def hold(self) -> None:
        """Raise bus.lease.LeaseLost unless this process still runs the operation."""
        ...


async def retrying(settings: Settings, attempt: Callable[[int], Awaitable[T]]) -> T:
    """Run ``attempt(n)`` until it succeeds. Transient CloudStack failures are retried for
    ``cloudstack_retry_budget`` seconds (a management-server restart takes minutes), each
    wait drawn at random below a doubling, capped delay ("full jitter": many operations
    that failed together do not all come back at the same instant); then the operation
    fails with cloudstack_unavailable. The one backoff loop of the executor."""
    started = time.monotonic()
    deadline = started + settings.cloudstack_retry_budget
    n = 0
    while True:
        try:
            return await attempt(n)
        except CloudStackError as e:
            if not e.transient:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                RETRIES_EXHAUSTED.inc()
                raise CloudStackError(
                    "cloudstack_unavailable",
                    f"CloudStack is unavailable: {e.message}; gave up after {n + 1} attempts "
                    f"over {time.monotonic() - started:.0f} s (VOLUMED_CLOUDSTACK_RETRY_BUDGET)",
                ) from None
            ceiling = settings.cloudstack_retry_backoff * 2 ** min(n, 30)
            delay = random.uniform(0, min(settings.cloudstack_retry_cap, ceiling))
            log.info("transient CloudStack failure (attempt %d): %s", n + 1, e.message)
            RETRIES.inc()
            # The last wait ends at the deadline, so the budget is always used in full.
            await asyncio.sleep(min(delay, left))
            n += 1


async def mutate(
    ctx: Context,
    phase: Phase,
    command: str,
    params: dict[str, Any],
    already_done: Callable[[], Awaitable[dict[str, Any] | None]],
    *,
    is_async: bool = True,
    learned: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Send one CloudStack mutation for ``phase`` of the operation, exactly once.

    ``already_done`` looks CloudStack up and returns the result if the mutation took effect
    (used whenever it may have been sent before: lost answer, restart). ``learned`` is
    called with the id of the volume a createVolume made, before the record keeps it."""
    rec = ctx.record
    if phase in rec.results:  # done before a restart
        done: dict[str, Any] = rec.results[phase]
        return done
    if rec.phase != phase:
        rec.phase, rec.job_id, rec.mutation_sent = phase, None, None

    async def attempt(_: int) -> dict[str, Any]:
        if rec.job_id:
            try:
                result = await ctx.cloud.wait(
                    rec.job_id,
                    max_interval=ctx.settings.cloudstack_poll_interval,
                    deadline=time.monotonic() + ctx.settings.cloudstack_job_timeout,
                )
            except CloudStackError as e:
                if not e.job_failed:
                    raise
                # This job changed nothing; but another send of the mutation may have: a
                # process that lost the lease while paused between its check and its send
                # (then this job failed as a repeat). Look before sending it again.
                rec.job_id = None
                found = await _look_up(ctx, already_done, params.get("id"))
                if found is not None:
                    return await finished(found)
                rec.mutation_sent = None  # that attempt is over; a transient one may be sent again
                await ctx.save()
                raise
            return await finished(result)
        if rec.mutation_sent is not None:
            found = await _look_up(ctx, already_done, params.get("id"))
            if found is not None:
                return await finished(found)
        ctx.hold()  # never sent by a process that may no longer be the only one running it
        # On CloudStack's clock: it is compared with the `created` of the volumes it made,
        # perhaps by another host whose clock differs from this one's.
        rec.mutation_sent = ctx.cloud.clock.now()
        await ctx.save()
        ctx.hold()  # (the save may have been slow exactly when renewals were)
        # A process that took the operation over while this one was paused between its
        # check and its send is found by the record's next write (its job id here, the
        # next phase's or the terminal one after a synchronous call): compare-and-set, it
        # fails (LeaseLost) and this process stops; the taker looks the mutation up.
        if not is_async:
            answer = await ctx.cloud.call(command, **params)
            return await finished(answer if isinstance(answer, dict) else {"result": answer})
        job: Job = await ctx.cloud.start(command, **params)
        rec.job_id = job.job_id
        if job.volume_id and not rec.volume_id:
            if learned is not None:
                # Before the save that may find a takeover: harmless then, the claim is
                # this operation's id either way (the taker finds the volume its own).
                await learned(job.volume_id)
            rec.volume_id = job.volume_id
        await ctx.save()
        return await attempt(0)

    async def finished(result: dict[str, Any]) -> dict[str, Any]:
        # Kept with the record's next save (the next phase, or the terminal event). Until
        # then a restart still has the job id or "mutation sent" and finds the same result.
        rec.results[phase] = result
        rec.job_id, rec.mutation_sent = None, None
        return result

    return await retrying(ctx.settings, attempt)


async def _look_up(
    ctx: Context,
    already_done: Callable[[], Awaitable[dict[str, Any] | None]],
    volume_id: Any,
) -> dict[str, Any] | None:
    """``already_done()``, asked only once no CloudStack job works on the volume any more.

    A mutation whose answer was lost (accept-then-drop, a restart before the job id was
    stored) may still be running: until its job ends the volume shows the old state, and
    sending the mutation again would be refused as a repeat (a second attach or detach),
    or undo a newer change. CloudStack lists the job working on a volume (``jobid``): wait
    for it, then look. For a create the volume is known only once found by name."""
    if volume_id:
        volume = await ctx.cloud.volume(str(volume_id))
        if volume is not None and volume.get("jobid"):
            await _job_ended(ctx, str(volume["jobid"]))
    found = await already_done()
    pending = _volume_of(found).get("jobid") if found is not None else None
    if pending:
        await _job_ended(ctx, str(pending))
        found = await already_done()
    return found


async def _job_ended(ctx: Context, job_id: str) -> None:
    """Wait for a job to end; a failed one changed nothing, which the look-up then sees."""
    try:
        await ctx.cloud.wait(
            job_id,
            max_interval=ctx.settings.cloudstack_poll_interval,
            deadline=time.monotonic() + ctx.settings.cloudstack_job_timeout,
        )
    except CloudStackError as e:
        if not e.job_failed:
            raise


def _volume_of(result: dict[str, Any]) -> dict[str, Any]:
    volume = result.get("volume", result)
    return volume if isinstance(volume, dict) else {}


async def _find_volume(ctx: Context, volume_id: str) -> dict[str, Any]:
    volume = await retrying(ctx.settings, lambda _: ctx.cloud.volume(volume_id))
    if volume is None:
        raise OperationFailed(
            "not_found", f"volume {volume_id} does not exist in CloudStack", volume_id=volume_id
        )
    return volume


# -- create ---------------------------------------------------------------------------------


def _about(ctx: Context, volume_id: str | None) -> None:
    """Every later log line of this operation's task names it (actors.logs.bind)."""
    bind(operation_id=ctx.record.operation_id, volume_id=volume_id)


async def create(ctx: Context, cmd: CreateCommand) -> Outcome:
    rec = ctx.record
    _about(ctx, rec.volume_id)
    key: CreateKey = (cmd.name, cmd.size, cmd.zone_id, cmd.disk_offering_id)
    claimed = False  # this create holds its volume (volume owners)

    async def claim(volume_id: str) -> None:
        """Claim a volume this create made; it must not be another operation's."""
        nonlocal claimed
        holder = await ctx.owners.claim(volume_id, rec.operation_id)
        if holder is not None:
            raise OperationFailed(
                "cloudstack_error",
                f"createVolume made volume {volume_id}, but operation {holder} holds it; "
                "volumed leaves it to that operation and made no other volume",
            )
        claimed = True
        _about(ctx, volume_id)

    async def already_done() -> dict[str, Any] | None:
        nonlocal claimed
        if rec.volume_id:
            found = await ctx.cloud.volume(rec.volume_id)
            if found:
                await claim(rec.volume_id)
                return {"volume": found}
            # That volume is gone: its job failed and CloudStack dropped it. A later
            # attempt whose answer was lost is only found by name (else an orphan).
        found = await _find_created(ctx, cmd, key, rec.mutation_sent or ctx.cloud.clock.now())
        if found is not None:
            claimed = True
            _about(ctx, str(_volume_of(found).get("id")))
        return found

    params = {
        "name": cmd.name,
        "size": cmd.size // GIB,
        "diskofferingid": cmd.disk_offering_id,
        "zoneid": cmd.zone_id,
    }
    result = await mutate(ctx, Phase.CREATE, "createVolume", params, already_done, learned=claim)
    volume = _volume_of(result)
    volume_id = str(volume.get("id") or rec.volume_id or "")
    if not volume_id:
        raise OperationFailed("cloudstack_error", "createVolume finished without a volume id")
    if not claimed:  # the job's result after a restart: the claim was made before
        await claim(volume_id)
    rec.volume_id = volume_id
    return Outcome(volume_id=volume_id, size=_int(volume.get("size")), response=volume)


async def _find_created(
    ctx: Context, cmd: CreateCommand, key: CreateKey, sent: float
) -> dict[str, Any] | None:
    """The volume a createVolume whose answer was lost made, or None if it made none.

    A volume is this create's only if it has its name, size, zone and offering, was created
    around the time the request was sent (``sent`` and ``created`` both on CloudStack's
    clock, never this host's: hosts' clocks may differ from it by any amount; a send made
    before any answer had taught the clock is on this host's, as before), and this create
    wins its claim: a volume another operation holds is never taken. A matching volume that
    no one holds yet may still be another create's, in any process, that has not claimed it
    yet (OtherCreates): those are waited for, and where volumed still cannot tell, the
    create fails without taking or deleting anything."""
    me = ctx.record.operation_id
    deadline: float | None = None  # of the wait for other creates to settle
    while True:
        same = [
            v
            for v in await ctx.cloud.volumes_named(cmd.name)
            if _int(v.get("size")) == cmd.size
            and v.get("zoneid") == cmd.zone_id
            and v.get("diskofferingid") == cmd.disk_offering_id
        ]
        holders = {str(v.get("id")): await ctx.owners.owner(str(v.get("id"))) for v in same}
        for volume in same:
            if holders[str(volume.get("id"))] == me:
                return {"volume": volume}  # claimed before a restart
        free = [
            v
            for v in same
            if holders[str(v.get("id"))] is None and _created_near(v.get("created"), sent)
        ]
        if not free:
            return None  # every match is another operation's: this create made none
        try:
            # A create that holds a volume of these parameters made no other: not in doubt.
            held = set(holders.values())
            others = [o for o in await ctx.creates.in_doubt(key, me) if o not in held]
            why = ""
        except CannotTell as e:
            others, why = [], str(e)
        if others or why:
            if deadline is None:
                deadline = time.monotonic() + ctx.settings.cloudstack_timeout
            if time.monotonic() < deadline:
                await asyncio.sleep(CREATES_POLL)
                continue
            if why:
                raise OperationFailed(
                    "cloudstack_error",
                    f"the answer to createVolume was lost, and volume {free[0].get('id')} "
                    f"named {cmd.name!r} may be this operation's or another create's not "
                    f"known yet, which volumed cannot tell now ({why}); volumed will not "
                    "guess: check the volumes of that name in CloudStack",
                )
            raise OperationFailed(
                "cloudstack_error",
                f"the answer to createVolume was lost, and volume {free[0].get('id')} named "
                f"{cmd.name!r} may be this operation's or that of {', '.join(others)} (same "
                "name, size, zone and offering, not yet known); volumed will not guess: "
                "check the volumes of that name in CloudStack",
            )
        if len(free) > 1:
            ids = ", ".join(str(v.get("id")) for v in free)
            raise OperationFailed(
                "cloudstack_error",
                f"the answer to createVolume was lost and several volumes named {cmd.name!r} "
                f"of the same size, zone and offering were created since ({ids}) that no "
                "operation holds; volumed will not guess which is this operation's",
            )
        if await ctx.owners.claim(str(free[0].get("id")), me) is None:
            return {"volume": free[0]}
        # Taken meanwhile by its own create: look again.


def _created_near(created: Any, sent: float) -> bool:
    at = epoch_of(created)
    return at is not None and abs(at - sent) <= CREATE_LOOKUP_SKEW


# -- attach ---------------------------------------------------------------------------------


async def attach(ctx: Context, cmd: AttachCommand) -> Outcome:
    rec = ctx.record
    _about(ctx, cmd.volume_id)
    is_local = await ctx.serves(cmd.vm_id, wait=True)

    if rec.phase == Phase.NONE and CHECKED not in rec.results:
        # Nothing sent yet: an attached volume is refused before anything is sent, so that
        # a lost answer can never make another attachment look like this operation's (and
        # a roll-back can never detach it). Not an idempotent "completed": a completed
        # attach names the device this operation proved, and the old one is not its proof.
        volume = await _find_volume(ctx, cmd.volume_id)
        where = volume.get("virtualmachineid")
        if where:
            raise OperationFailed(
                "conflict",
                f"volume {cmd.volume_id} is already attached to VM {where}"
                + (" (this host)" if where == await ctx.local_vm_id() else "")
                + (f" as device {volume['deviceid']}" if volume.get("deviceid") is not None else "")
                + "; detach it first",
                volume_id=cmd.volume_id,
                vm_id=cmd.vm_id,
            )
        rec.results[CHECKED] = {"virtualmachineid": None}  # saved with "mutation sent"

    async def already_done() -> dict[str, Any] | None:
        volume = await ctx.cloud.volume(cmd.volume_id)
        if volume is None:
            raise OperationFailed(
                "not_found", f"volume {cmd.volume_id} does not exist", volume_id=cmd.volume_id
            )
        if volume.get("virtualmachineid") != cmd.vm_id:
            return None
        return {"volume": volume, LOOKED_UP: True}

    params: dict[str, Any] = {"id": cmd.volume_id, "virtualmachineid": cmd.vm_id}
    if cmd.as_root:
        params["deviceid"] = 0
    if rec.attach_started_at is None:
        rec.attach_started_at, rec.attach_clock = time.time(), ctx.clock
    result = await mutate(ctx, Phase.ATTACH, "attachVolume", params, already_done)
    # This operation made the attachment if its own job said so, or if the volume was free
    # before it sent anything (then the attachment found after a lost answer is its own).
    made = CHECKED in rec.results or not result.get(LOOKED_UP)
    volume = _volume_of(result)
    size = _int(volume.get("size"))
    outcome = Outcome(
        volume_id=cmd.volume_id, vm_id=cmd.vm_id, size=size, response=volume, attached=True
    )
    if not is_local:
        return outcome

    # Resumed while rolling back: the phase keeps the roll-back's job id and "mutation sent",
    # so the detach is looked up, never sent blind again, and no device is taken any more.
    rolling_back = rec.phase.rolling_back
    if not rolling_back:
        rec.phase = Phase.CORRELATE
        await ctx.save()
    request = CorrelateRequest(
        operation_id=rec.operation_id,
        volume_id=cmd.volume_id,
        vm_id=cmd.vm_id,
        size=size or 0,
        serial=serial_of(cmd.volume_id),
        started_at=rec.attach_started_at,
        clock=rec.attach_clock,
    )
    result_ = await ctx.devices.correlate(request, ctx.settings.correlation_timeout)
    if rolling_back and result_.error is None:
        result_ = CorrelateResult(
            operation_id=rec.operation_id,
            volume_id=cmd.volume_id,
            error=ErrorInfo(
                code="device_timeout",
                message="volumed restarted while it rolled this attach back",
            ),
        )
    if result_.error is None and result_.device_path:
        outcome.proof = result_.proof
        outcome.device_path = result_.device_path
        outcome.by_id_path = result_.by_id_path
        return outcome
    code: ErrorCode = result_.error.code if result_.error else "device_timeout"
    message = result_.error.message if result_.error else "no device was found for the volume"
    # Nothing half done: the volume is detached again before the attach is reported failed,
    # but only an attachment this operation made.
    attached = True
    if not made:
        message += (
            "; the volume was not detached again: volumed cannot prove this operation "
            "attached it, it is still attached"
        )
    else:
        try:
            await _detach_in_cloudstack(
                ctx, cmd.volume_id, cmd.vm_id, phase=Phase.ROLLBACK, local=True
            )
            message += "; the volume was detached again"
            attached = False
        except OperationError as e:
            message += f"; detaching it again FAILED, it is still attached: {e.message}"
    raise OperationFailed(
        code, message, volume_id=cmd.volume_id, vm_id=cmd.vm_id, attached=attached
    )


# Keys of OpRecord.results beyond the phases: the volume was free before this attach sent
# anything; a result that a look-up found rather than the operation's own job.
CHECKED = "attach-check"
LOOKED_UP = "looked_up"


# -- detach and delete ------------------------------------------------------------------------


async def _detach_in_cloudstack(
    ctx: Context, volume_id: str, vm_id: str, *, phase: Phase, local: bool
) -> dict[str, Any]:
    device_path = await ctx.devices.device_of(volume_id) if local else None

    async def already_done() -> dict[str, Any] | None:
        volume = await ctx.cloud.volume(volume_id)
        if volume is None:
            raise OperationFailed(
                "not_found", f"volume {volume_id} does not exist", volume_id=volume_id
            )
        return None if volume.get("virtualmachineid") else {"volume": volume}

    result = await mutate(ctx, phase, "detachVolume", {"id": volume_id}, already_done)
    if local:
        ctx.record.phase = phase.release
        await ctx.save()
        gone, message = await ctx.devices.release(
            ReleaseRequest(
                operation_id=ctx.record.operation_id, volume_id=volume_id, device_path=device_path
            ),
            vm_id,
            ctx.settings.detach_timeout,
        )
        result = {**result, "device_released": gone}
        if not gone:
            result["device_release_warning"] = message
    return result


async def detach(ctx: Context, cmd: DetachCommand) -> Outcome:
    _about(ctx, cmd.volume_id)
    volume = await _find_volume(ctx, cmd.volume_id)
    vm_id = volume.get("virtualmachineid") or ctx.record.vm_id
    if not vm_id:
        raise OperationFailed(
            "conflict", f"volume {cmd.volume_id} is not attached to a VM", volume_id=cmd.volume_id
        )
    ctx.record.vm_id = str(vm_id)
    local = await ctx.serves(str(vm_id))
    result = await _detach_in_cloudstack(
        ctx, cmd.volume_id, str(vm_id), phase=Phase.DETACH, local=local
    )
    return Outcome(
        volume_id=cmd.volume_id,
        vm_id=str(vm_id),
        response=_volume_of(result) | {k: v for k, v in result.items() if k.startswith("device_")},
        attached=False,
    )


async def delete(ctx: Context, cmd: DeleteCommand) -> Outcome:
    rec = ctx.record
    _about(ctx, cmd.volume_id)
    if rec.phase != Phase.DELETE:  # the delete itself has not been sent yet
        volume = await _find_volume(ctx, cmd.volume_id)
        vm_id = volume.get("virtualmachineid") or (rec.vm_id if rec.phase.detaching_first else None)
        if vm_id:
            rec.vm_id = str(vm_id)
            await _detach_in_cloudstack(
                ctx,
                cmd.volume_id,
                str(vm_id),
                phase=Phase.DETACH_FIRST,
                local=await ctx.serves(str(vm_id)),
            )

    async def already_done() -> dict[str, Any] | None:
        volume = await ctx.cloud.volume(cmd.volume_id)
        return {"success": True} if volume is None else None

    try:
        result = await mutate(
            ctx, Phase.DELETE, "deleteVolume", {"id": cmd.volume_id}, already_done, is_async=False
        )
    except OperationError as e:
        if Phase.DETACH_FIRST not in rec.results:
            raise
        # The detach took effect: say so, and let the mapping follow (attached False).
        raise OperationFailed(
            e.code,
            f"volume {cmd.volume_id} was detached from VM {rec.vm_id}, then deleting it "
            f"failed: {e.message}",
            volume_id=cmd.volume_id,
            vm_id=rec.vm_id,
            attached=False,
        ) from None
    return Outcome(volume_id=cmd.volume_id, vm_id=rec.vm_id, response=result, attached=False)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def attachment_after(record: OpRecord) -> bool | None:
    """The volume's attachment to the record's VM as far as the record's finished steps
    tell (OperationEvent.attached), for an operation that ends without its own outcome."""
    done = record.results
    if Phase.ROLLBACK in done or Phase.DETACH in done or Phase.DETACH_FIRST in done:
        return False
    if record.type == "attach" and Phase.ATTACH in done:
        return True
    return None
