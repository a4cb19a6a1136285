"""What each command does in CloudStack, safe to resume and never sending a mutation twice.

Rule for every mutation: the record says "mutation sent" before it goes out, and the job id
as soon as it is known. If the answer is lost or the process restarts, the operation looks
the job or the volume up before it considers sending anything again
(apache/cloudstack#14214: a second detach can undo a newer attach).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from actors.executor.cloudstack import CloudStack, CloudStackError, Job
from schemas.commands import AttachCommand, CreateCommand, DeleteCommand, DetachCommand
from schemas.common import GIB, ErrorCode, serial_of
from schemas.config import Settings
from schemas.internal import CorrelateRequest, CorrelateResult, OpRecord, ReleaseRequest

log = logging.getLogger("volumed.executor")
T = TypeVar("T")

# A create whose answer was lost is recognised by its exact name among the volumes created
# around the time it was sent; CloudStack's clock may differ from ours by this much.
CREATE_LOOKUP_SKEW = 300.0


class OperationFailed(Exception):
    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        volume_id: str | None = None,
        vm_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.volume_id = volume_id
        self.vm_id = vm_id


@dataclass
class Outcome:
    volume_id: str | None = None
    vm_id: str | None = None
    device_path: str | None = None
    by_id_path: str | None = None
    size: int | None = None
    response: dict[str, Any] = field(default_factory=dict)


class Devices(Protocol):
    """The correlator, as the executor sees it."""

    async def correlate(self, request: CorrelateRequest, timeout: float) -> CorrelateResult: ...

    async def release(
        self, request: ReleaseRequest, vm_id: str, timeout: float
    ) -> tuple[bool, str]: ...

    async def device_of(self, volume_id: str) -> str | None: ...


class Context(Protocol):
    """What an operation needs from the executor around it."""

    settings: Settings
    cloud: CloudStack
    devices: Devices
    record: OpRecord

    async def save(self) -> None: ...

    async def local_vm_id(self) -> str | None: ...

    def note_proof(self, proof: str) -> None: ...


async def retrying(settings: Settings, attempt: Callable[[int], Awaitable[T]]) -> T:
    """Run ``attempt(n)`` until it succeeds, retrying transient CloudStack failures with
    bounded exponential backoff; then fail with cloudstack_unavailable."""
    delay = settings.cloudstack_retry_backoff
    tries = settings.cloudstack_retries + 1
    for n in range(tries):
        try:
            return await attempt(n)
        except CloudStackError as e:
            if not e.transient:
                raise
            if n + 1 >= tries:
                raise CloudStackError(
                    "cloudstack_unavailable",
                    f"CloudStack is unavailable: {e.message}; gave up after {tries} attempts",
                ) from None
            log.info("transient CloudStack failure (attempt %d of %d): %s", n + 1, tries, e.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


async def mutate(
    ctx: Context,
    phase: str,
    command: str,
    params: dict[str, Any],
    already_done: Callable[[], Awaitable[dict[str, Any] | None]],
    *,
    is_async: bool = True,
) -> dict[str, Any]:
    """Send one CloudStack mutation for ``phase`` of the operation, exactly once.

    ``already_done`` looks CloudStack up and returns the result if the mutation took effect
    (used whenever it may have been sent before: lost answer, restart)."""
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
                if e.job_failed:  # that attempt is over; a transient one may be sent again
                    rec.job_id, rec.mutation_sent = None, None
                    await ctx.save()
                raise
            return await finished(result)
        if rec.mutation_sent is not None:
            found = await _look_up(ctx, already_done, params.get("id"))
            if found is not None:
                return await finished(found)
        rec.mutation_sent = time.time()
        await ctx.save()
        if not is_async:
            answer = await ctx.cloud.call(command, **params)
            return await finished(answer if isinstance(answer, dict) else {"result": answer})
        job: Job = await ctx.cloud.start(command, **params)
        rec.job_id = job.job_id
        if job.volume_id and not rec.volume_id:
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


async def create(ctx: Context, cmd: CreateCommand) -> Outcome:
    rec = ctx.record

    async def already_done() -> dict[str, Any] | None:
        if rec.volume_id:
            found = await ctx.cloud.volume(rec.volume_id)
            if found:
                return {"volume": found}
            # That volume is gone: its job failed and CloudStack dropped it. A later attempt
            # whose answer was lost is only found by name (else it would be an orphan).
        sent = rec.mutation_sent or time.time()
        candidates = [
            v
            for v in await ctx.cloud.volumes_named(cmd.name)
            if _created_near(v.get("created"), sent)
        ]
        if len(candidates) > 1:
            ids = ", ".join(str(v.get("id")) for v in candidates)
            raise OperationFailed(
                "cloudstack_error",
                f"the answer to createVolume was lost and several volumes named {cmd.name!r} "
                f"were created since ({ids}); volumed will not guess which is this operation's",
            )
        return {"volume": candidates[0]} if candidates else None

    params = {
        "name": cmd.name,
        "size": cmd.size // GIB,
        "diskofferingid": cmd.disk_offering_id,
        "zoneid": cmd.zone_id,
    }
    result = await mutate(ctx, "create", "createVolume", params, already_done)
    volume = _volume_of(result)
    volume_id = str(volume.get("id") or rec.volume_id or "")
    if not volume_id:
        raise OperationFailed("cloudstack_error", "createVolume finished without a volume id")
    rec.volume_id = volume_id
    return Outcome(volume_id=volume_id, size=_int(volume.get("size")), response=volume)


def _created_near(created: Any, sent: float) -> bool:
    import datetime as dt

    if not isinstance(created, str):
        return False
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"):
        try:
            at = dt.datetime.strptime(created, fmt).timestamp()
        except ValueError:
            continue
        return abs(at - sent) <= CREATE_LOOKUP_SKEW
    return False


# -- attach ---------------------------------------------------------------------------------


async def attach(ctx: Context, cmd: AttachCommand) -> Outcome:
    rec = ctx.record
    local_vm = await ctx.local_vm_id()
    is_local = local_vm is not None and cmd.vm_id == local_vm

    async def already_done() -> dict[str, Any] | None:
        volume = await ctx.cloud.volume(cmd.volume_id)
        if volume is None:
            raise OperationFailed(
                "not_found", f"volume {cmd.volume_id} does not exist", volume_id=cmd.volume_id
            )
        return {"volume": volume} if volume.get("virtualmachineid") == cmd.vm_id else None

    params: dict[str, Any] = {"id": cmd.volume_id, "virtualmachineid": cmd.vm_id}
    if cmd.as_root:
        params["deviceid"] = 0
    if rec.attach_started_at is None:
        rec.attach_started_at = time.time()
    result = await mutate(ctx, "attach", "attachVolume", params, already_done)
    volume = _volume_of(result)
    size = _int(volume.get("size"))
    outcome = Outcome(volume_id=cmd.volume_id, vm_id=cmd.vm_id, size=size, response=volume)
    if not is_local:
        return outcome

    rec.phase = "correlate"
    await ctx.save()
    request = CorrelateRequest(
        operation_id=rec.operation_id,
        volume_id=cmd.volume_id,
        vm_id=cmd.vm_id,
        size=size or 0,
        serial=serial_of(cmd.volume_id),
        started_at=rec.attach_started_at,
    )
    result_ = await ctx.devices.correlate(request, ctx.settings.correlation_timeout)
    if result_.error is None and result_.device_path:
        ctx.note_proof(getattr(result_, "proof", ""))
        outcome.device_path = result_.device_path
        outcome.by_id_path = result_.by_id_path
        return outcome
    code: ErrorCode = result_.error.code if result_.error else "device_timeout"
    message = result_.error.message if result_.error else "no device was found for the volume"
    # Nothing half done: the volume is detached again before the attach is reported failed.
    try:
        await _detach_in_cloudstack(ctx, cmd.volume_id, cmd.vm_id, phase="rollback", local=True)
        message += "; the volume was detached again"
    except (CloudStackError, OperationFailed) as e:
        detail = e.message if isinstance(e, CloudStackError | OperationFailed) else str(e)
        message += f"; detaching it again FAILED, it is still attached: {detail}"
    raise OperationFailed(code, message, volume_id=cmd.volume_id, vm_id=cmd.vm_id)


# -- detach and delete ------------------------------------------------------------------------


async def _detach_in_cloudstack(
    ctx: Context, volume_id: str, vm_id: str, *, phase: str, local: bool
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
        ctx.record.phase = f"{phase}-release"
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
    volume = await _find_volume(ctx, cmd.volume_id)
    vm_id = volume.get("virtualmachineid") or ctx.record.vm_id
    if not vm_id:
        raise OperationFailed(
            "conflict", f"volume {cmd.volume_id} is not attached to a VM", volume_id=cmd.volume_id
        )
    ctx.record.vm_id = str(vm_id)
    local = str(vm_id) == await ctx.local_vm_id()
    result = await _detach_in_cloudstack(
        ctx, cmd.volume_id, str(vm_id), phase="detach", local=local
    )
    return Outcome(
        volume_id=cmd.volume_id,
        vm_id=str(vm_id),
        response=_volume_of(result) | {k: v for k, v in result.items() if k.startswith("device_")},
    )


async def delete(ctx: Context, cmd: DeleteCommand) -> Outcome:
    rec = ctx.record
    if rec.phase != "delete":  # the delete itself has not been sent yet
        volume = await _find_volume(ctx, cmd.volume_id)
        vm_id = volume.get("virtualmachineid") or (
            rec.vm_id if rec.phase.startswith("detach-first") else None
        )
        if vm_id:
            rec.vm_id = str(vm_id)
            local = str(vm_id) == await ctx.local_vm_id()
            await _detach_in_cloudstack(
                ctx, cmd.volume_id, str(vm_id), phase="detach-first", local=local
            )

    async def already_done() -> dict[str, Any] | None:
        volume = await ctx.cloud.volume(cmd.volume_id)
        return {"success": True} if volume is None else None

    result = await mutate(
        ctx, "delete", "deleteVolume", {"id": cmd.volume_id}, already_done, is_async=False
    )
    return Outcome(volume_id=cmd.volume_id, vm_id=rec.vm_id, response=result)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
