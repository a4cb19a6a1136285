"""The executor's side of device correlation: hand-offs to the correlator over the bus."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import msgspec

from bus import Bus
from bus.topology import (
    CORRELATION,
    correlate_request_subject,
    correlate_result_subject,
    correlator_consumer,
    release_request_subject,
    release_result_subject,
)
from schemas.events import ErrorInfo
from schemas.internal import CorrelateRequest, CorrelateResult, ReleaseRequest, ReleaseResult

# Beyond the correlator's own timeout: how long the executor waits for a correlator that
# may not be running at all before it calls the device lost.
_MARGIN = 10.0
_NOT_SERVED_TTL = 5.0  # seconds a VM found without correlator is believed so


class BusDevices:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._served: set[str] = set()
        self._not_served: dict[str, float] = {}  # vm id → when last found not served

    async def serves(self, vm_id: str) -> bool:
        """Whether a correlator takes VM ``vm_id``'s hand-offs: its durable consumer exists
        (made when that host's correlator first started; hand-offs wait in the stream
        while it is down). Hosts are added, never removed, while volumed runs."""
        if vm_id in self._served:
            return True
        if time.monotonic() - self._not_served.get(vm_id, -math.inf) < _NOT_SERVED_TTL:
            return False
        if await self.bus.consumer_exists(correlator_consumer(vm_id)):
            self._served.add(vm_id)
            return True
        self._not_served[vm_id] = time.monotonic()
        return False

    async def _exchange(
        self, request_subject: str, request: object, result_subject: str, timeout: float
    ) -> bytes | None:
        """Publish ``request`` and wait for the answer on ``result_subject``; an answer
        already in the stream (given before a restart) is taken without asking again."""
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_result(_subject: str, data: bytes, _reply: str | None) -> None:
            if not got.done():
                got.set_result(data)

        unsubscribe = await self.bus.subscribe(result_subject, on_result)
        try:
            earlier = await self.bus.last_message(CORRELATION.name, result_subject)
            if earlier is not None:
                return earlier
            await self.bus.publish(request_subject, request)
            try:
                return await asyncio.wait_for(got, timeout)
            except TimeoutError:
                return None
        finally:
            with contextlib.suppress(Exception):
                await unsubscribe()

    async def correlate(self, request: CorrelateRequest, timeout: float) -> CorrelateResult:
        data = await self._exchange(
            correlate_request_subject(request.vm_id),
            request,
            correlate_result_subject(request.operation_id),
            timeout + _MARGIN,
        )
        if data is None:
            return CorrelateResult(
                operation_id=request.operation_id,
                volume_id=request.volume_id,
                error=ErrorInfo(
                    code="device_timeout",
                    message=(
                        f"no device correlator answered for VM {request.vm_id} within "
                        f"{timeout + _MARGIN:.0f} s: is `volumed run correlator watcher` running "
                        "on that host?"
                    ),
                ),
            )
        return msgspec.json.decode(data, type=CorrelateResult)

    async def release(
        self, request: ReleaseRequest, vm_id: str, timeout: float
    ) -> tuple[bool, str]:
        data = await self._exchange(
            release_request_subject(vm_id),
            request,
            release_result_subject(request.operation_id),
            timeout + _MARGIN,
        )
        if data is None:
            return False, f"no device correlator confirmed the device of {request.volume_id} left"
        result = msgspec.json.decode(data, type=ReleaseResult)
        return result.gone, result.message

    async def device_of(self, volume_id: str) -> str | None:
        """The device path recorded for the volume (via the persistence query), if any."""
        try:
            data = await self.bus.request(
                "volume.api.mapping", {"volume_id": volume_id}, timeout=2.0
            )
        except Exception:
            return None
        try:
            mapping = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        return mapping.get("device_path") if isinstance(mapping, dict) else None
