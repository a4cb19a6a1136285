"""Group events that arrive together into one transaction.

Each handler submits its event and awaits the commit of the batch it landed in. Batches run
one at a time, in arrival order, so an operation's events are applied in the order the
stream delivered them. While one batch commits, the next fills up: under load batches grow
by themselves and an idle system adds no more than ``linger`` of latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from actors.metrics import DATABASE_ERRORS, EVENTS_STORED
from actors.persistence.errors import StoreRefused, StoreUnavailable
from actors.persistence.records import Event
from actors.persistence.store import Store
from bus import Abandon, Reject, Retry

log = logging.getLogger("volumed.persistence.batcher")

_MAX_DELAY = 15.0
_Item = tuple[Event, "asyncio.Future[None]"]


class Batcher:
    def __init__(self, store: Store, *, max_batch: int = 500, linger: float = 0.002) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger = linger
        # None ends ``run`` once everything before it is applied.
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._closing = False
        self._failures = 0  # consecutive batches that found the database unavailable
        self._down_since: float | None = None
        self.batches = 0
        self.applied = 0

    async def submit(self, event: Event) -> None:
        """Return once ``event`` is committed; raise Retry/Reject/Abandon for the bus."""
        if self._closing:
            raise Abandon("the persistence actor is stopping")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, future))
        await future

    async def run(self) -> None:
        """Apply batches until ``close`` (then drain what was submitted) or cancellation."""
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                batch = [item]
                if self._queue.qsize() < self.max_batch and self.linger > 0:
                    await asyncio.sleep(self.linger)
                stop = False
                while self._queue.qsize() and len(batch) < self.max_batch:
                    more = self._queue.get_nowait()
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                await self._apply(batch)
                if stop:
                    break
        finally:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None and not item[1].done():
                    item[1].set_exception(Abandon("the persistence actor stopped"))

    async def close(self, task: asyncio.Task[None]) -> None:
        """Take no more events, apply the queued ones, and end ``task`` (running ``run``)."""
        self._closing = True
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _apply(self, batch: list[_Item]) -> None:
        batch = [(e, f) for e, f in batch if not f.done()]  # handler cancelled meanwhile
        if not batch:
            return
        try:
            await self.store.apply([e for e, _ in batch])
        except StoreUnavailable as e:
            DATABASE_ERRORS.inc()
            self._failures += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
            # The longer the outage, the longer events wait before the next try: a short
            # blip costs half a second, a long outage does not spin.
            outage = time.monotonic() - self._down_since
            delay = min(max(0.5, outage / 2), _MAX_DELAY)
            if self._failures == 1 or self._failures % 50 == 0:
                log.warning("database unavailable (%s); events wait %.1f s in the stream", e, delay)
            reason = f"database unavailable: {e}"
            _settle(batch, lambda: Retry(reason, delay))
        except StoreRefused as e:
            if len(batch) == 1:
                op_id = batch[0][0].raw.operation_id
                log.error(
                    "the database refused event %s: %s", op_id, e, extra={"operation_id": op_id}
                )
                reason = f"the database refused the event: {e}"
                _settle(batch, lambda: Reject(reason))
            else:
                # One bad event must not hold back the others: find it alone.
                for item in batch:
                    await self._apply([item])
        except Exception as e:
            DATABASE_ERRORS.inc()
            log.exception("applying %d events failed", len(batch))
            reason = f"{type(e).__name__}: {e}"
            _settle(batch, lambda: RuntimeError(reason))
        else:
            if self._failures:
                log.info("database available again")
            self._failures = 0
            self._down_since = None
            self.batches += 1
            self.applied += len(batch)
            EVENTS_STORED.inc(len(batch))
            _settle(batch, None)


def _settle(batch: list[_Item], outcome: Callable[[], BaseException] | None) -> None:
    for _, future in batch:
        if future.done():
            continue
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome())  # one exception object per waiting handler
