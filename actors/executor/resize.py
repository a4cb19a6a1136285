"""Resize: ``resizeVolume`` as an async job, then, for a volume attached to a VM whose devices
volumed watches, the wait until the watcher shows its device at the new size.

Safe to resume as every operation is (operations.mutate): before anything is sent the volume
is looked up once, so that a shrink without ``shrink_ok`` fails before any CloudStack
mutation; then the record keeps "mutation sent" and the job id, so a resumed resize waits for
that job or finds the volume at its new size, and never sends resizeVolume again. Once the
job has ended its answer is saved before the device is waited for: a resize resumed then
only waits again.

A resize never detaches anything: a device that does not show the new size in time fails the
resize with ``device_timeout`` and leaves the volume attached as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec

from actors.executor.operations import (
    Context,
    OperationFailed,
    Outcome,
    _find_volume,
    _int,
    _volume_of,
    mutate,
)
from actors.logs import bind
from bus import Bus
from bus.topology import DEVICES_BUCKET, device_subject
from schemas.commands import ResizeCommand
from schemas.common import GIB, serial_of
from schemas.devices import DeviceEvent, DeviceInfo
from schemas.internal import Phase

# OpRecord.results key beside the phases: the volume's size before anything was sent.
CHECKED = "resize-check"
# Seconds between reads of the device snapshot while no device event wakes the wait (events
# published before the wait subscribed are only in the snapshot).
_SNAPSHOT_EVERY = 0.5
_device_event = msgspec.json.Decoder(DeviceEvent)


class _Listed(msgspec.Struct):
    """The devices of a VM's device list (a DeviceSnapshot, or an older watcher's
    inventory event: both have them)."""

    devices: tuple[DeviceInfo, ...] = ()


_listed = msgspec.json.Decoder(_Listed)


async def resize(ctx: Context, cmd: ResizeCommand, sizes: DeviceSizes) -> Outcome:
    rec = ctx.record
    bind(operation_id=rec.operation_id, volume_id=cmd.volume_id)
    result: dict[str, Any] | None = None
    if rec.phase == Phase.NONE and CHECKED not in rec.results:
        # Nothing sent yet (the only time the volume's own size is the one it had before).
        volume = await _find_volume(ctx, cmd.volume_id)
        before = _int(volume.get("size"))
        if before is not None and cmd.size < before and not cmd.shrink_ok:
            raise OperationFailed(
                "invalid_request",
                f"volume {cmd.volume_id} is {_gib(before)}: resizing it to {_gib(cmd.size)} "
                "would shrink it and lose the data beyond; send shrink_ok: true "
                "(`volumed resize --shrink-ok`) to shrink it",
                volume_id=cmd.volume_id,
            )
        if before == cmd.size:
            result = {"volume": volume}  # already that size: nothing to send
        else:
            rec.results[CHECKED] = {"size": before}  # saved with "mutation sent"

    if result is None:

        async def already_done() -> dict[str, Any] | None:
            volume = await ctx.cloud.volume(cmd.volume_id)
            if volume is None:
                raise OperationFailed(
                    "not_found", f"volume {cmd.volume_id} does not exist", volume_id=cmd.volume_id
                )
            return {"volume": volume} if _int(volume.get("size")) == cmd.size else None

        params: dict[str, Any] = {"id": cmd.volume_id, "size": cmd.size // GIB}
        if cmd.shrink_ok:
            params["shrinkok"] = "true"
        result = await mutate(ctx, Phase.RESIZE, "resizeVolume", params, already_done)
        await ctx.save()  # the answer is kept: resumed from here, only the device is awaited

    volume = _volume_of(result)
    size = _int(volume.get("size")) or cmd.size
    vm_id = volume.get("virtualmachineid")
    if CHECKED in rec.results:
        volume = {**volume, "previous_size": rec.results[CHECKED]["size"]}
    outcome = Outcome(
        volume_id=cmd.volume_id, vm_id=str(vm_id) if vm_id else None, size=size, response=volume
    )
    if vm_id and await ctx.serves(str(vm_id)):
        device = await sizes.wait(
            ctx, cmd.volume_id, str(vm_id), size, ctx.settings.correlation_timeout
        )
        outcome.device_path, outcome.by_id_path = device.path, device.by_id_path
    return outcome


class DeviceSizes:
    """Waits for a VM's watcher to show a volume's device at a size: from the VM's device
    events (as they come) and its device snapshot (what was seen before the wait began)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def wait(
        self, ctx: Context, volume_id: str, vm_id: str, size: int, timeout: float
    ) -> DeviceInfo:
        """The volume's device once it shows ``size`` bytes; OperationFailed
        ``device_timeout`` when it has not within ``timeout`` seconds."""
        # The device the mapping names (proven by the correlator); else the one with the
        # volume's serial. A device at that name with another serial is another disk.
        mapped = await ctx.devices.device_of(volume_id)
        serial = serial_of(volume_id)

        def ours(d: DeviceInfo) -> bool:
            return d.serial == serial or (not d.serial and d.path == mapped)

        seen: DeviceInfo | None = None
        wake = asyncio.Event()

        async def on_device(_subject: str, data: bytes, _reply: str | None) -> None:
            nonlocal seen
            with contextlib.suppress(msgspec.DecodeError):
                event = _device_event.decode(data)
                if event.kind == "inventory":  # a watcher (re)started: what it lists is all
                    seen = next((d for d in event.devices if ours(d)), None)
                    wake.set()
                elif event.device is not None and ours(event.device):
                    seen = None if event.kind == "removed" else event.device
                    wake.set()

        snapshots = await self.bus.bucket(DEVICES_BUCKET, msgspec.Raw)

        async def listed() -> DeviceInfo | None:
            got = await snapshots.get(vm_id)
            with contextlib.suppress(msgspec.DecodeError):
                if got is not None:
                    return next((d for d in _listed.decode(got[0]).devices if ours(d)), None)
            return None

        unsubscribe = await self.bus.subscribe(device_subject(vm_id), on_device)
        deadline = time.monotonic() + timeout
        try:
            seen = await listed() or seen
            while seen is None or seen.size != size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationFailed(
                        "device_timeout",
                        _timed_out(volume_id, vm_id, size, timeout, seen, mapped, serial),
                        volume_id=volume_id,
                        vm_id=vm_id,
                    )
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(left, _SNAPSHOT_EVERY))
                if not wake.is_set():
                    seen = await listed()
            return seen
        finally:
            with contextlib.suppress(Exception):
                await unsubscribe()


def _timed_out(
    volume_id: str,
    vm_id: str,
    size: int,
    timeout: float,
    seen: DeviceInfo | None,
    mapped: str | None,
    serial: str,
) -> str:
    done = f"CloudStack resized volume {volume_id} to {_gib(size)}, but "
    if seen is None:
        where = f"neither {mapped} (its mapping) nor" if mapped else "no mapping names one, nor"
        return (
            f"{done}no device of VM {vm_id} is known to be it ({where} a device with serial "
            f"{serial}) after {timeout:.0f} s; the volume stays attached"
        )
    return (
        f"{done}its device {seen.path} still shows {_gib(seen.size)} after {timeout:.0f} s "
        "(VOLUMED_CORRELATION_TIMEOUT): the guest has not seen the new capacity yet; the "
        "volume stays attached, nothing was undone"
    )


def _gib(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size} bytes"
