"""Whether the database takes writes, as the last write found, and whose turn it is.

Open while writes succeed. The first write the database refuses (errors.py: every store
error is the database's, never the event's) closes it: from then on one write at a time
probes the database, after a pause that grows with the outage (half a second, up to 15 s),
and the writes that arrive meanwhile wait for that probe's outcome: if it failed, their
messages go back to the stream (nak with that pause), never to the dead letters. The
persistence actor also lets its consumers take only one message at a time while the gate is
closed, so an outage costs a probe per pause, not a pass over the whole backlog. The first
write that succeeds opens the gate again; health names the cause while it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from actors.persistence.errors import StoreUnavailable
from bus import Retry

log = logging.getLogger("volumed.persistence.gate")
T = TypeVar("T")

FIRST_PAUSE = 0.5
MOST_PAUSE = 15.0
_LOG_EVERY = 60.0  # seconds between the warnings of one outage


class WriteGate:
    def __init__(self, *, first: float = FIRST_PAUSE, most: float = MOST_PAUSE) -> None:
        self.first = first
        self.most = most
        self.cause: str | None = None
        """Why the last write failed; None while writes succeed."""
        self.since: float | None = None  # time.monotonic() of the first refusal
        self.refusals = 0
        self._next_try = 0.0
        self._probe: asyncio.Future[None] | None = None
        self._logged = 0.0
        # Called with True when the gate opens, False when it closes.
        self.listeners: list[Callable[[bool], None]] = []

    @property
    def open(self) -> bool:
        return self.cause is None

    def pause(self) -> float:
        """How long a refused message waits in the stream: a short blip costs half a
        second, a long outage does not spin."""
        if self.since is None:
            return self.first
        return min(max(self.first, (time.monotonic() - self.since) / 2), self.most)

    async def write(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` (one write) when it is its turn. Raises Retry (the bus naks the
        message with the pause) when the database refused it or refuses writes now."""
        if self.cause is not None:
            if self._probe is not None:
                # Another write probes the database now: its outcome is this one's too.
                await asyncio.shield(self._probe)
                if self.cause is not None:
                    raise Retry(self._reason(), self.pause())
            else:
                probe = self._probe = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.sleep(max(0.0, self._next_try - time.monotonic()))
                    return await self._attempt(work)
                finally:
                    self._probe = None
                    probe.set_result(None)
        return await self._attempt(work)

    async def _attempt(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await work()
        except StoreUnavailable as e:
            self.refused(str(e))
            raise Retry(self._reason(), self.pause()) from None
        self.succeeded()
        return result

    def refused(self, cause: str) -> None:
        now = time.monotonic()
        self.refusals += 1
        closing = self.cause is None
        self.cause = cause
        if closing:
            self.since = now
        self._next_try = now + self.pause()
        if closing or now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.warning(
                "the database refuses writes (%s); events wait in the stream, one try every "
                "%.1f s at most",
                cause,
                self.most,
            )
        if closing:
            self._tell(False)

    def succeeded(self) -> None:
        if self.cause is None:
            return
        outage = time.monotonic() - (self.since or time.monotonic())
        log.info("the database takes writes again (after %.1f s)", outage)
        self.cause = None
        self.since = None
        self._tell(True)

    def _reason(self) -> str:
        return f"the database refuses writes: {self.cause}"

    def _tell(self, opened: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(opened)
            except Exception:
                log.exception("a write gate listener failed")
