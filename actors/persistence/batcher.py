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
from collections.abc import Callable

from actors.metrics import DATABASE_ERRORS, EVENTS_STORED
from actors.persistence.errors import StoreUnavailable
from actors.persistence.records import Event
from actors.persistence.store import Store
from bus import Abandon

log = logging.getLogger("volumed.persistence.batcher")

_Item = tuple[Event, "asyncio.Future[None]"]


class Batcher:
    def __init__(self, store: Store, *, max_batch: int = 500, linger: float = 0.002) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger = linger
        # None ends ``run`` once everything before it is applied.
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._closing = False
        self.batches = 0
        self.applied = 0

    async def submit(self, event: Event) -> None:
        """Return once ``event`` is committed; raise StoreUnavailable when the database
        refused its batch, Abandon when stopping."""
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
            # The database's refusal, whatever the statement was (errors.py): each handler
            # hands it to the write gate, which keeps its event waiting in the stream.
            DATABASE_ERRORS.inc()
            error_type, text = type(e), str(e)
            _settle(batch, lambda: error_type(text))
        except Exception as e:
            DATABASE_ERRORS.inc()
            if len(batch) > 1:
                # Not the database's answer (a bug in volumed): one event must not hold
                # back the others, so each is tried alone.
                for item in batch:
                    await self._apply([item])
                return
            op_id = batch[0][0].raw.operation_id
            log.exception("applying event %s failed", op_id, extra={"operation_id": op_id})
            # Redelivered with the consumer's backoff; never dead-lettered (max_deliver -1).
            reason = f"{type(e).__name__}: {e}"
            _settle(batch, lambda: RuntimeError(reason))
        else:
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
