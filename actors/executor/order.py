"""Per-volume order across every executor process: the command stream is the queue.

Operations on one volume take effect one at a time, in the order of their commands in the
command stream, whichever executor processes run them. An operation waits for its turn:
until every earlier command on its volume is done. "Earlier commands on its volume" are
read from the stream itself, between the executor consumer's ack floor (every command up to
it is acknowledged, which volumed does only once its operation is terminal) and its own
sequence; each process reads each command once (cached). An operation's place is its
command's first occurrence in that window (a re-sent id claimed first by a later copy still
runs at the original's place). "Done" is: the operation's record is terminal and so is the
last event on its subject (a successor's `executing` never precedes it in the stream), or
the command is a later copy of an operation placed earlier. No lease, no queue to keep
consistent, nothing that a dead process can leave behind: a dead process's operation is
simply not done until another executor has resumed and finished it.

Why not a per-volume lease: whoever holds a lease first runs first, and deliveries race
across processes (the server hands commands 10 and 11 to two processes at once, or command
10 again after its first process died), so a lease alone cannot keep acceptance order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from bus import Bucket, Bus
from bus.connection import StoredMessage
from bus.tasks import Backoff
from bus.topology import EVENTS, ConsumerSpec, event_subject
from schemas.common import TERMINAL
from schemas.internal import OpRecord


class _Status(msgspec.Struct):
    status: str = ""


_status_decoder = msgspec.json.Decoder(_Status)


def _status_of(data: bytes) -> str:
    try:
        return _status_decoder.decode(data).status
    except msgspec.MsgspecError:
        return ""


# A command's volume (None: it names none, or is invalid) and its operation id.
Identity = tuple[str | None, str]
Identify = Callable[[StoredMessage], Identity]

_FLOOR_MAX_AGE = 0.5  # seconds an ack floor read is reused
_READ_CONCURRENCY = 32
_POLL = 0.1  # seconds between looks at operations that other processes run


class VolumeOrder:
    def __init__(
        self, bus: Bus, ops: Bucket[OpRecord], consumer: ConsumerSpec, identify: Identify
    ) -> None:
        self._bus = bus
        self._ops = ops
        self._consumer = consumer
        self._identify = identify
        self._known: dict[int, Identity] = {}  # stream sequence → its command's identity
        self._floor = 0
        self._pruned_at = 0  # the floor below which _known was last emptied
        self._floor_read = -1.0
        # Operation id → resolved when it is done (see ``ended``); one look-up loop for all.
        self._watched: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def note(self, stream_seq: int, volume_id: str | None, operation_id: str) -> None:
        """A command this process has read anyway (saves reading it again)."""
        self._known[stream_seq] = (volume_id, operation_id)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def ended_here(self, operation_id: str) -> None:
        """An operation turned terminal in this process: its waiters go on at once."""
        future = self._watched.pop(operation_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def turn(self, volume_id: str, stream_seq: int, operation_id: str) -> None:
        """Wait until every command on ``volume_id`` before this operation's place is done."""
        earlier = await self._earlier(volume_id, stream_seq)
        place = min([s for s, op in earlier.items() if op == operation_id], default=stream_seq)
        for seq, op_id in sorted(earlier.items()):
            if seq < place and op_id != operation_id:
                await self._command_done(seq, op_id)

    async def ended(self, operation_id: str) -> None:
        """Wait until the operation is terminal, wherever it runs. Waiters of one operation
        share one look-up, so a flood of re-sent copies costs one read per poll."""
        future = self._watched.get(operation_id)
        if future is None or future.done():
            future = self._watched[operation_id] = asyncio.get_running_loop().create_future()
            self._wake.set()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        await asyncio.shield(future)

    async def _watch(self) -> None:
        """Look up every watched operation now and then; resolve those that are done."""
        while True:
            for op_id, future in list(self._watched.items()):
                if future.done() or future.cancelled():
                    self._watched.pop(op_id, None)
            if not self._watched:
                self._wake.clear()
                await self._wake.wait()
            ids = list(self._watched)
            results = await asyncio.gather(*(self._ended(i) for i in ids), return_exceptions=True)
            for op_id, ended in zip(ids, results, strict=True):
                if ended is True:
                    self.ended_here(op_id)
            await asyncio.sleep(_POLL)

    async def _ended(self, operation_id: str) -> bool:
        """Terminal, and its terminal event is out (the last on its subject)."""
        got = await self._ops.get(operation_id)
        if got is None or got[0].status not in TERMINAL:
            return False
        last = await self._bus.last_stored(EVENTS.name, event_subject(operation_id))
        return last is not None and _status_of(last.data) in TERMINAL

    async def _command_done(self, stream_seq: int, operation_id: str) -> None:
        """Wait until the command at ``stream_seq`` is done: acknowledged (below the ack
        floor), or a later copy of an operation claimed at an earlier place, or its operation
        ended."""
        backoff = Backoff(0.01, 4 * _POLL)
        while True:
            if stream_seq <= await self._ack_floor():
                return
            got = await self._ops.get(operation_id)
            if got is not None:  # else not even claimed yet: its delivery is late
                if got[0].stream_seq < stream_seq:
                    return  # a copy: its operation runs at its earlier place
                await self.ended(operation_id)
                return
            await backoff.pause()

    async def _earlier(self, volume_id: str, stream_seq: int) -> dict[int, str]:
        floor = await self._ack_floor()
        if floor > self._pruned_at:  # (only when the floor moved: this runs per operation)
            self._pruned_at = floor
            for seq in [s for s in self._known if s <= floor]:
                del self._known[seq]
        missing = [s for s in range(floor + 1, stream_seq) if s not in self._known]
        sem = asyncio.Semaphore(_READ_CONCURRENCY)

        async def read(seq: int) -> None:
            async with sem:
                stored = await self._bus.stored(self._consumer.stream, seq)
            # Gone (aged out, or never there): no operation of it can still be running.
            self._known[seq] = self._identify(stored) if stored is not None else (None, "")

        await asyncio.gather(*(read(s) for s in missing))
        earlier: dict[int, str] = {}
        for seq in range(floor + 1, stream_seq):
            volume, op_id = self._known.get(seq, (None, ""))  # gone: below a newer floor
            if volume == volume_id:
                earlier[seq] = op_id
        return earlier

    async def _ack_floor(self) -> int:
        if time.monotonic() - self._floor_read > _FLOOR_MAX_AGE:
            progress = await self._bus.consumer_progress(self._consumer)
            self._floor = max(self._floor, progress.ack_floor)
            self._floor_read = time.monotonic()
        return self._floor
