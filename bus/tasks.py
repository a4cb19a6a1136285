"""Two small pieces of asyncio every layer needs: how to wait between tries, and how to
stop tasks that hold work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

# The one shutdown grace of volumed, flowing from the supervisor down. After ``stop()`` the
# supervisor lets its actors end by themselves within GRACE seconds, then cancels those still
# running and gives them UNWIND seconds more. Every wait inside an actor nests in that and is
# never longer: a consumer gives its in-flight handlers GRACE - UNWIND seconds and the ones
# it then cancels UNWIND, so it has ended when the supervisor's grace is up; an actor that
# the supervisor cancels waits at most UNWIND for its own tasks. Nothing is left running when
# the supervisor closes the connection, and what was cancelled stays unacknowledged.
GRACE = 10.0
UNWIND = 2.0


class Backoff:
    """Doubling pauses between tries, from ``first`` up to ``cap`` seconds; ``reset`` after
    a success. The one backoff of volumed's retry and polling loops (CloudStack calls have
    their own, with jitter and a time budget: actors.executor.operations.retrying)."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    async def pause(self, stop: asyncio.Event | None = None) -> None:
        """Wait the current delay (less if ``stop`` is set meanwhile), then double it."""
        if stop is None:
            await asyncio.sleep(self.delay)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await stop.wait()
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first


async def finish(tasks: Collection[asyncio.Task[object]], grace: float, then: float) -> None:
    """Let ``tasks`` end by themselves within ``grace`` seconds (they were told to stop),
    then cancel those still running and give them ``then`` seconds to unwind. The one
    grace-then-cancel of volumed: work in flight is finished where it can be, and what is
    cancelled stays unacknowledged, so the server hands it to another process."""
    pending = [t for t in tasks if not t.done()]
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace)
    for task in still:
        task.cancel()
    if still:
        await asyncio.wait(still, timeout=then)
