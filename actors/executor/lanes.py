"""Per-volume order: operations on one volume take effect in the order they were accepted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Lanes:
    """A queue per key. ``enter`` must be called in acceptance order (it is synchronous up to
    its first await); each holder runs only after every earlier holder of the key is done."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def join(self, key: str | None) -> Slot:
        """Take the next place in ``key``'s lane, now, before any await."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        previous = self._tails.get(key) if key else None
        if key:
            self._tails[key] = done
        return Slot(self, key, previous, done)

    def _release(self, key: str | None, slot_done: asyncio.Future[None]) -> None:
        if key and self._tails.get(key) is slot_done:
            del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)


class Slot:
    def __init__(
        self,
        lanes: Lanes,
        key: str | None,
        previous: asyncio.Future[None] | None,
        done: asyncio.Future[None],
    ) -> None:
        self._lanes = lanes
        self.key = key
        self._previous = previous
        self._done = done

    @property
    def waiting(self) -> bool:
        return self._previous is not None and not self._previous.done()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for every earlier operation on the key, then hold the lane."""
        if self._previous is not None:
            await asyncio.shield(self._previous)
        yield

    def leave(self) -> None:
        """Give the lane to the next holder once every earlier one is done (idempotent).
        A slot that leaves without its turn (a duplicate, a rejection) must not let its
        successor overtake its predecessor, so the hand-over waits for the predecessor."""
        if self._done.done():
            return
        previous = self._previous
        if previous is None or previous.done():
            self._finish()
        else:
            previous.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
        self._lanes._release(self.key, self._done)
