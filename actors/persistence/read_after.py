"""Queries that reflect every event published before them (contract §4).

A subscriber can receive an event before the persistence actor has committed it: the event
reaches subscribers and the stream at once, and the writer batches. So a query that arrives
first reads the last sequence of each READ_AFTER consumer's stream and waits until that
consumer's ack floor has reached it. The floor is the server's, not this process's: it
works with any number of persistence processes sharing the consumer, because each acks an
event only after its transaction committed (terminated events count as done too).

The wait costs requests to the server, so waiting queries share them: one loop polls for
all of them and stops when none waits; a query that finds the floor there already waits
for no more than one round (one consumer info request, when the consumer is idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from bus import Bus
from bus.connection import ConsumerProgress
from bus.topology import READ_AFTER, ConsumerSpec

log = logging.getLogger("volumed.persistence.read_after")

POLL = 0.002  # seconds between rounds while queries wait for the writer (one batch or so)
# A floor that has not moved for this long belongs to a writer that is stuck or stopped:
# it is asked less and less often, up to every _POLL_MAX.
_STILL = 0.1
_POLL_MAX = 0.05
_ERROR_PAUSE = 0.1  # after a failed round (NATS away, consumer missing): no busy loop
_BLIND_MAX = 30.0
"""Seconds a query waits at most while the floors cannot be read (its asker has long given
up by then)."""
_LOG_EVERY = 10.0  # seconds: a writer that is behind is reported once per period


@dataclass(eq=False)
class _Waiter:
    after: int
    """The rounds started before it arrived: only later rounds can speak for it."""
    future: asyncio.Future[None]
    targets: dict[str, int] | None = field(default=None)
    """Stream → its last sequence, read after the query arrived."""


class ReadAfter:
    """``await wait()`` before a query reads the database."""

    def __init__(
        self,
        bus: Bus,
        consumers: tuple[ConsumerSpec, ...] = READ_AFTER,
        *,
        timeout: float,
        poll: float = POLL,
    ) -> None:
        self.bus = bus
        self.consumers = consumers
        self.timeout = timeout
        self.poll = poll
        self.rounds = 0  # rounds started, ever
        self.late = 0  # queries answered without the wait completing, ever
        self._waiting: set[_Waiter] = set()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[list[ConsumerProgress], dict[str, int]] | None = None
        self._last_error = ""
        self._late_logged = 0
        self._logged_at = 0.0
        self._blind = False  # the last round could not read the floors
        self._read_round = 0  # the last round that read them

    async def wait(self) -> bool:
        """Return True once every event published before this call is in the database;
        False when ``timeout`` passed first (the caller answers from the database anyway,
        and the lag is logged). Time in which the floors could not be read (a blip of this
        process's connection) does not count."""
        if self.timeout <= 0 or not self.consumers:
            return True
        loop = asyncio.get_running_loop()
        waiter = _Waiter(self.rounds, loop.create_future())
        self._waiting.add(waiter)
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="read-after")
        arrived = loop.time()
        deadline = arrived + self.timeout
        blind_after: int | None = None  # a round after this one must read the floors
        try:
            while not (await asyncio.wait({waiter.future}, timeout=deadline - loop.time()))[0]:
                # The bound is for a writer that is behind, not for a blip of this process's
                # connection: while the floors cannot be read (nor the answer sent), wait
                # on, and give the writer the whole bound again once a round begun after
                # the blip has read them (one in flight through the cut only times out).
                now = loop.time()
                if now - arrived > _BLIND_MAX:
                    break
                if self._blind or not self.bus.connected:
                    blind_after, deadline = self.rounds, now + _ERROR_PAUSE
                elif blind_after is not None and self._read_round <= blind_after:
                    deadline = now + _ERROR_PAUSE
                elif blind_after is not None:
                    blind_after, deadline = None, now + self.timeout
                else:
                    break
            else:
                return True
            self._report_late()
            return False
        finally:
            self._waiting.discard(waiter)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        pause = self.poll
        floors: list[int] = []
        moved_at = time.monotonic()
        while self._waiting:
            self._arrived.clear()
            self.rounds += 1
            try:
                progress = await self._round(self.rounds)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                log.debug("reading the consumers' progress failed: %s", self._last_error)
                pause = _ERROR_PAUSE
                self._blind = True
            else:
                self._blind, self._read_round = False, self.rounds
                if [p.ack_floor for p in progress] != floors:
                    floors, moved_at = [p.ack_floor for p in progress], time.monotonic()
                still = time.monotonic() - moved_at > _STILL
                pause = min(pause * 2, _POLL_MAX) if still else self.poll
            # A query that arrived meanwhile needs a round of its own at once; the others
            # wait for the writer, which commits a batch every few milliseconds.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), pause)

    async def _round(self, current: int) -> list[ConsumerProgress]:
        """One look at the server for every query that arrived before round ``current``;
        release those it proves written. Return the progress read."""
        # Every request of this round is made after each eligible query arrived.
        eligible = [w for w in self._waiting if w.after < current]
        progress = list(
            await asyncio.gather(*(self.bus.consumer_progress(c) for c in self.consumers))
        )
        if all(p.idle for p in progress):
            # Nothing undelivered, nothing unacked: every event before now is written.
            self._release(eligible)
            return progress
        untargeted = [w for w in eligible if w.targets is None]
        if untargeted:
            streams = sorted({c.stream for c in self.consumers})
            seqs = await asyncio.gather(*(self.bus.last_sequence(s) for s in streams))
            targets = dict(zip(streams, seqs, strict=True))
            for w in untargeted:
                w.targets = targets
        # The floor only rises: one read before the target's still proves it was reached.
        self._release(
            [
                w
                for w in eligible
                if w.targets is not None
                and all(
                    p.covers(w.targets[c.stream])
                    for c, p in zip(self.consumers, progress, strict=True)
                )
            ]
        )
        if untargeted:
            self._last = (progress, targets)
        return progress

    def _release(self, waiters: list[_Waiter]) -> None:
        for w in waiters:
            self._waiting.discard(w)
            if not w.future.done():
                w.future.set_result(None)

    def _report_late(self) -> None:
        self.late += 1
        now = time.monotonic()
        if now - self._logged_at < _LOG_EVERY:
            return
        count, self._late_logged, self._logged_at = self.late - self._late_logged, self.late, now
        if self._last is not None:
            progress, targets = self._last
            where = ", ".join(
                f"{c.durable} acked to {p.ack_floor} of {targets[c.stream]}"
                for c, p in zip(self.consumers, progress, strict=True)
            )
        else:
            where = self._last_error or "no progress read yet"
        log.warning(
            "%d quer%s answered from the database before it held every earlier event "
            "(waited %.1f s; %s): the writer is behind or stopped",
            count,
            "y" if count == 1 else "ies",
            self.timeout,
            where,
        )
