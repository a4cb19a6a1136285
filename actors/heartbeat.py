"""Each actor's heartbeat: its own checks, refreshed in the health bucket.

The health query (actors/persistence/health.py) reads these; a heartbeat older than three
intervals counts as the actor being gone. One loop for every actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable

from bus import Bucket, Bus
from bus.topology import HEALTH_BUCKET
from schemas.internal import CheckResult, Heartbeat

log = logging.getLogger("volumed.heartbeat")

Checks = Callable[[], Awaitable[dict[str, CheckResult]]]


async def beat(
    bus: Bus,
    actor: str,
    instance: str,
    interval: float,
    checks: Checks,
    *,
    now: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Store ``checks()`` as the heartbeat of ``actor`` every ``interval`` seconds, and at
    once whenever ``now`` is set, until ``stop`` is set (or the task is cancelled). A
    heartbeat that cannot be stored is skipped: the next one may be."""
    key = re.sub(r"[^-/_=.a-zA-Z0-9]", "_", f"{actor}.{instance}")
    bucket: Bucket[Heartbeat] | None = None
    while stop is None or not stop.is_set():
        if now is not None:
            now.clear()  # before the checks are read: a change meanwhile makes another beat
        try:
            if bucket is None:
                bucket = await bus.bucket(HEALTH_BUCKET, Heartbeat)
            found = await checks()
            refusal = bus.store_refusal
            if refusal is not None:
                # This process's publishes wait for room in JetStream: the health answer
                # (served by another process, maybe) names the cause.
                found = {
                    **found,
                    "jetstream": CheckResult(
                        status="degraded",
                        detail=f"refuses to store messages for {refusal.age():.0f} s: "
                        f"{refusal.cause}",
                    ),
                }
            await bucket.put(
                key, Heartbeat(actor=actor, instance=instance, at=time.time(), checks=found)
            )
        except Exception as e:
            log.debug("%s: heartbeat not stored: %s", actor, e)
        raise_if_cancelled()
        if now is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await now.wait()


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed. On Python 3.11, asyncio.wait_for
    (inside nats-py's requests) returns the result when it completes together with a
    cancel, and the loop around it would then wait for ever on its next await; the task
    still counts the cancel request, so it is checked after every bus call."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
