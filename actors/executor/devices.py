"""The executor's side of device correlation: hand-offs to the correlator over the bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import msgspec

from bus import Bus, Unavailable, ask
from bus.tasks import Backoff
from bus.topology import (
    API_MAPPING,
    CORRELATION,
    correlate_request_subject,
    correlate_result_subject,
    correlator_consumer,
    release_request_subject,
    release_result_subject,
)
from schemas.events import ErrorInfo
from schemas.internal import CorrelateRequest, CorrelateResult, ReleaseRequest, ReleaseResult
from schemas.queries import MappingQuery

# Beyond the correlator's own timeout: how long the executor waits for a correlator that
# may not be running at all before it calls the device lost.
_MARGIN = 10.0
_NOT_SERVED_TTL = 5.0  # seconds a VM found without correlator is believed so
_RECHECK = 5.0
"""Seconds between reads of a hand-off's answer from the stream while waiting for it, in
case a cut went unnoticed (a reconnect wakes the wait at once)."""
_DEVICE_OF_PATIENCE = 10.0
"""Seconds a detach asks again for its volume's recorded device while no answer comes."""

log = logging.getLogger("volumed.executor.devices")


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
        self,
        request_subject: str,
        request: object,
        msg_id: str,
        result_subject: str,
        timeout: float,
    ) -> bytes | None:
        """Hand ``request`` over and wait for the answer on ``result_subject``; None when
        none came within ``timeout`` seconds of the stream taking the request.

        Both go through the CORRELATION stream, so a blip of either side (a few seconds'
        cut of this process's or the correlator's connection) loses neither: the request
        is published again until the stream acknowledges it (``msg_id`` makes the copies
        one message), and the answer is read from the stream before asking (one given
        before a restart is taken without asking again), after every reconnect of this
        process (the live subscription misses what was published while it was cut), every
        ``_RECHECK`` seconds, and before giving up: only a read that the server answered
        says there is none."""
        loop = asyncio.get_running_loop()
        answers: list[bytes] = []
        wake = asyncio.Event()

        async def on_result(_subject: str, data: bytes, _reply: str | None) -> None:
            answers.append(data)
            wake.set()

        self.bus.on_reconnect.append(wake.set)
        try:
            unsubscribe = await self.bus.subscribe(result_subject, on_result)
        except BaseException:
            self.bus.on_reconnect.remove(wake.set)
            raise
        deadline: float | None = None  # set once the stream holds the request
        backoff = Backoff(0.2, _RECHECK)
        try:
            while True:
                wake.clear()  # before reading: what comes during the read wakes the wait
                if answers:
                    return answers[0]
                try:
                    stored = await self.bus.last_message(CORRELATION.name, result_subject)
                except Exception as e:  # cut, or the server busy: read again shortly
                    log.info("cannot read the answer on %s yet (%s)", result_subject, e)
                    stored, known = None, False
                else:
                    known = True
                if stored is not None:
                    return stored
                if deadline is None and await self._ask(request_subject, request, msg_id):
                    deadline = loop.time() + timeout
                if deadline is not None and loop.time() < deadline:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), min(_RECHECK, deadline - loop.time()))
                elif deadline is not None and known:
                    return None
                else:  # not asked yet, or the last read failed: again soon (reconnected: now)
                    await backoff.pause(wake)
        finally:
            self.bus.on_reconnect.remove(wake.set)
            with contextlib.suppress(Exception):
                await unsubscribe()

    async def _ask(self, subject: str, request: object, msg_id: str) -> bool:
        """Whether the stream took the request (a copy of one it has counts)."""
        try:
            await self.bus.publish(subject, request, msg_id=msg_id)
        except Unavailable:
            raise  # no stream for it: not a blip
        except Exception as e:
            log.info("hand-off on %s not acknowledged yet (%s); sending it again", subject, e)
            return False
        return True

    async def correlate(self, request: CorrelateRequest, timeout: float) -> CorrelateResult:
        data = await self._exchange(
            correlate_request_subject(request.vm_id),
            request,
            f"{request.operation_id}.attach",
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
            f"{request.operation_id}.detach",
            release_result_subject(request.operation_id),
            timeout + _MARGIN,
        )
        if data is None:
            return False, f"no device correlator confirmed the device of {request.volume_id} left"
        result = msgspec.json.decode(data, type=ReleaseResult)
        return result.gone, result.message

    async def device_of(self, volume_id: str) -> str | None:
        """The device path recorded for the volume (via the persistence query), if any.

        A query lost to a blip (no answer in time) is asked again for up to
        ``_DEVICE_OF_PATIENCE`` seconds: without the path, a correlator that restarted
        cannot tell a serial-less device is the volume's, and would call it gone."""
        backoff = Backoff(0.2, 2.0)
        give_up = asyncio.get_running_loop().time() + _DEVICE_OF_PATIENCE
        while True:
            try:
                mapping = await ask(self.bus, API_MAPPING, MappingQuery(volume_id=volume_id), 2.0)
                return mapping.device_path
            except TimeoutError:
                if asyncio.get_running_loop().time() + backoff.delay > give_up:
                    return None
                await backoff.pause()
            except Exception:  # no persistence, no mapping, a reply of another shape: none
                return None
