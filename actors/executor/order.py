"""Per-volume order across every executor process: the command stream is the queue.

Operations on one volume take effect one at a time, in the order of their commands in the
command stream, whichever executor processes run them. An operation waits for its turn:
until every earlier command on its volume is done. "Earlier commands on its volume" are
read from the stream itself, between the executor consumer's ack floor (every command up to
it is acknowledged, which volumed does only once its operation is terminal) and its own
sequence; each process reads each command once (cached, and forgotten once the floor has
passed it: what is kept is bounded by the commands not yet acknowledged and those after them
already read).

An operation id names one operation: its first command in the stream. A later command with
the same id is a copy (``first``: the actor looks before it claims the id, so a copy
delivered first never takes the operation's place): with the same body, a re-send; with
another (another volume, another type), a conflict that is rejected and waited for by
nobody. So a waiter waits only on first occurrences on its own volume, never on a copy, and
never on an operation of another volume. "Done" is: the operation's record is terminal and
so is the last event on its subject (a successor's `executing` never precedes it in the
stream). No lease, no queue to keep consistent, nothing that a dead process can leave
behind: a dead process's operation is simply not done until another executor has resumed
and finished it.

Why not a per-volume lease: whoever holds a lease first runs first, and deliveries race
across processes (the server hands commands 10 and 11 to two processes at once, or command
10 again after its first process died), so a lease alone cannot keep acceptance order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

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


class Identity(NamedTuple):
    """What the order needs of a command: its volume (None: it names none, or is invalid),
    its operation id, and its body (``body_key``: equal for the same command re-sent)."""

    volume_id: str | None
    operation_id: str
    body: str


_GONE = Identity(None, "", "")  # aged out of the stream (or never there)
Identify = Callable[[StoredMessage], Identity]

_FLOOR_MAX_AGE = 0.5  # seconds an ack floor read is reused
# Commands this process may keep in mind without reading the ack floor again (``_read``):
# beyond this many, every read prunes what the floor has passed.
_KNOWN_WITHOUT_FLOOR = 8
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
        # Operation id → the first sequence in _known with it: a copy finds its original
        # without walking the window (a flood of copies costs one look-up each).
        self._first: dict[str, int] = {}
        self._read_to = 0  # every command after the floor up to here is in _known
        # Reads under way, shared: a flood of commands needing the same ones reads each once.
        self._reads: dict[int, asyncio.Task[None]] = {}
        self._read_slots = asyncio.Semaphore(_READ_CONCURRENCY)
        self._floor = 0
        self._pruned_at = 0  # the floor below which _known was last emptied
        self._floor_read = -1.0
        # Operation id → resolved when it is done (see ``ended``); one look-up loop for all.
        self._watched: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def note(self, stream_seq: int, identity: Identity) -> None:
        """A command this process has read anyway (saves reading it again)."""
        if stream_seq > self._floor:
            self._learn(stream_seq, identity)

    def _learn(self, stream_seq: int, identity: Identity) -> None:
        self._known[stream_seq] = identity
        first = self._first.get(identity.operation_id)
        if first is None or stream_seq < first:
            self._first[identity.operation_id] = stream_seq

    @property
    def known(self) -> int:
        """How many commands this process keeps in mind (for tests and metrics)."""
        return len(self._known)

    @property
    def watched(self) -> int:
        return len(self._watched)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def ended_here(self, operation_id: str) -> None:
        """An operation turned terminal in this process: its waiters go on at once."""
        future = self._watched.pop(operation_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def first(self, stream_seq: int, operation_id: str) -> tuple[int, Identity] | None:
        """The first command with ``operation_id`` before ``stream_seq`` that is not yet
        acknowledged, if any: then the command at ``stream_seq`` is a copy of it. (One below
        the ack floor was claimed before the floor passed it: its claim tells.)"""
        await self._read(stream_seq)
        seq = self._first.get(operation_id)
        if seq is None or seq >= stream_seq or seq <= self._floor:
            return None
        if seq <= await self._ack_floor():  # (``_read`` may have used an older floor)
            return None
        return seq, self._known[seq]

    async def turn(self, volume_id: str, stream_seq: int, operation_id: str) -> None:
        """Wait until every operation on ``volume_id`` before this one is done. Only first
        occurrences count: a copy (re-sent, or a conflict) is no operation of its own."""
        window = await self._window(stream_seq)
        seen: set[str] = set()
        earlier: list[tuple[int, str]] = []
        for seq in sorted(window):
            identity = window[seq]
            if identity.operation_id in seen or identity.operation_id == operation_id:
                continue
            seen.add(identity.operation_id)
            if identity.volume_id == volume_id:
                earlier.append((seq, identity.operation_id))
        for seq, op_id in earlier:
            await self._command_done(seq, op_id, volume_id)

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

    async def _command_done(self, stream_seq: int, operation_id: str, volume_id: str) -> None:
        """Wait until the command at ``stream_seq`` (the first in the window with its id) is
        done: acknowledged (below the ack floor), or a copy of an operation claimed before
        the window (its place is earlier, and its volume's order was kept there), or its
        operation ended."""
        backoff = Backoff(0.01, 4 * _POLL)
        while True:
            if stream_seq <= await self._ack_floor():
                return
            got = await self._ops.get(operation_id)
            if got is not None:  # else not even claimed yet: its delivery is late
                record = got[0]
                if record.stream_seq != stream_seq or record.volume_id != volume_id:
                    # Claimed by another command: an earlier one (this is a copy), or, from
                    # a volumed before one id named one operation, a later one, which may
                    # be another volume's: never wait on that.
                    return
                await self.ended(operation_id)
                return
            await backoff.pause()

    async def _window(self, stream_seq: int) -> dict[int, Identity]:
        """Every command after the ack floor and before ``stream_seq``, by sequence."""
        floor = await self._read(stream_seq)
        # (Entries below a floor that moved meanwhile may be gone: they are done.)
        return {seq: self._known[seq] for seq in range(floor + 1, stream_seq) if seq in self._known}

    async def _read(self, stream_seq: int) -> int:
        """Know every command after the ack floor and before ``stream_seq``; the floor (as
        last read, if every command after it is known already).

        The floor is not read again while every command between the floor as last read and
        ``stream_seq`` is known here and this process keeps few in mind (at most
        ``_KNOWN_WITHOUT_FLOOR``), which spares a consumer-info request and its reply for most
        commands when they come one by one.
        That is safe because the floor only rises: a window from an older floor holds every
        command of the newer one, and its extra ones are acknowledged, so they are found
        done as they are looked at (``_command_done`` reads the floor), or, found as the
        original of a copy, are checked against the floor read again (``first``)."""
        if len(self._known) <= _KNOWN_WITHOUT_FLOOR and all(
            seq in self._known for seq in range(self._floor + 1, stream_seq)
        ):
            return self._floor
        floor = await self._ack_floor()
        if floor > self._pruned_at:  # (only when the floor moved: this runs per command)
            self._pruned_at = floor
            for seq in [s for s in self._known if s <= floor]:
                op_id = self._known.pop(seq).operation_id
                if self._first.get(op_id) == seq:
                    del self._first[op_id]
        start = max(floor, self._read_to) + 1
        reads = []
        for seq in range(start, stream_seq):
            if seq not in self._known:
                task = self._reads.get(seq)
                if task is None:
                    task = self._reads[seq] = asyncio.create_task(self._read_one(seq))
                reads.append(asyncio.shield(task))
        await asyncio.gather(*reads)
        self._read_to = max(self._read_to, stream_seq - 1)
        return floor

    async def _read_one(self, seq: int) -> None:
        try:
            async with self._read_slots:
                stored = await self._bus.stored(self._consumer.stream, seq)
            # Gone (aged out, or never there): no operation of it can still be running.
            self._learn(seq, self._identify(stored) if stored is not None else _GONE)
        finally:
            self._reads.pop(seq, None)

    async def _ack_floor(self) -> int:
        if time.monotonic() - self._floor_read > _FLOOR_MAX_AGE:
            progress = await self._bus.consumer_progress(self._consumer)
            self._floor = max(self._floor, progress.ack_floor)
            self._floor_read = time.monotonic()
        return self._floor
