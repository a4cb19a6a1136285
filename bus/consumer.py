"""Pulling messages from a durable consumer, and the one place that acks them.

Messages stream in as the server has them (a pull request stays open and is topped up),
so a command reaches its handler within a round trip, not after a batch fills. Each
message runs in its own task, up to ``concurrency`` at once, and its outcome decides:
- the handler returns        → ack
- it raises Retry(delay)     → nak with that delay
- it raises Reject           → dead-letter with the reason, then term
- it raises Abandon / is cancelled (shutdown) → nothing: redelivered after ack_wait
- any other exception        → nak after ``spec.nak_delays``; on the last allowed delivery,
                                 ``on_give_up`` (the handler's own ending of the work), then
                                 dead-letter and term; if ``on_give_up`` fails, nothing: the
                                 message comes back later and is given up then
- delivered more than ``spec.give_up_after`` times (its handlers' processes died): given up
  as above, without running the handler. What counts as a delivery is the handler's to say
  (``counted``): the executor counts only those that ran its operation or failed, never those
  that only waited for their turn and were handed back (a restart, a nak while parked)
While a handler runs, the message is kept alive with in_progress() heartbeats, well inside the
ack wait the server really applies to that delivery (``spec.ack_wait_of``). A handler that
only waits (``Delivery.parked``) does not count against ``concurrency``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from nats.aio.msg import Msg

from bus.connection import Bus
from bus.errors import Abandon, Reject, Retry
from bus.tasks import GRACE, UNWIND, finish
from bus.topology import DEAD_LETTER_PREFIX, ConsumerSpec

log = logging.getLogger("volumed.bus.consumer")

_PULL_EXPIRES = 20.0  # seconds a pull request stays open on the server
_IDLE_HEARTBEAT = 5.0  # the server proves the pull is alive this often
PARKED_SHARE = 4


class Delivery:
    """One delivery of a stream message to a handler."""

    def __init__(
        self, msg: Msg, spec: ConsumerSpec, park: Callable[[int], None] | None = None
    ) -> None:
        self._msg = msg
        self._park = park
        meta = msg.metadata
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.stream_seq: int = meta.sequence.stream
        self.num_delivered: int = meta.num_delivered
        self.published_at: float = meta.timestamp.timestamp() if meta.timestamp else time.time()
        self._spec = spec
        self.last = self.spent = False
        self.count(self.num_delivered)

    def count(self, deliveries: int) -> None:
        """Decide from ``deliveries`` (this one included) that count against the limit."""
        spec = self._spec
        # No delivery follows this one: a failure now gives it up (dead letter).
        limit = spec.give_up_after if spec.give_up_after > 0 else spec.max_deliver
        self.last = 0 < limit <= deliveries
        # Delivered more often than the consumer allows: given up without running.
        self.spent = 0 < spec.give_up_after < deliveries

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """While the handler only waits (for another message's work to end), it does not
        count against the consumer's concurrency: else waiters could fill every slot and
        the message they wait for, redelivered, would find none."""
        if self._park is not None:
            self._park(1)
        try:
            yield
        finally:
            if self._park is not None:
                self._park(-1)

    async def in_progress(self) -> None:
        """Tell the server this message is still being worked on (resets ack_wait)."""
        with contextlib.suppress(Exception):
            await self._msg.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]
GiveUp = Callable[[Delivery, str], Awaitable[None]]
Counted = Callable[[Delivery], Awaitable[int]]


class Consumer:
    """Runs ``handler`` for every message of a durable pull consumer. ``concurrency`` may
    be changed while it runs: it is read before each pull (persistence takes one message at
    a time while the database refuses writes)."""

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        concurrency: int = 64,
        on_give_up: GiveUp | None = None,
        counted: Counted | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.on_give_up = on_give_up
        self.counted = counted
        self.concurrency = concurrency
        self._tasks: set[asyncio.Task[None]] = set()
        self._credit = 0  # messages requested and not yet received
        self._parked = 0  # handlers that only wait (Delivery.parked)
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._last_seen = time.monotonic()
        self._stopping = asyncio.Event()
        self.handled = 0

    def stop(self) -> None:
        """Take no new messages; in-flight handlers go on (see ``run``)."""
        self._stopping.set()
        self._queue.put_nowait(None)

    async def run(self, grace: float = GRACE - UNWIND) -> None:
        nc = self.bus.nc
        inbox = nc.new_inbox()
        wake = self._wake
        self.bus.on_reconnect.append(wake)
        sub = await nc.subscribe(inbox, cb=self._on_message)
        pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.spec.stream}.{self.spec.durable}"
        seen_reconnects = self.bus.reconnects
        try:
            while not self._stopping.is_set():
                if self.bus.reconnects != seen_reconnects:
                    # A server restart forgets open pull requests: ask again at once.
                    seen_reconnects = self.bus.reconnects
                    self._credit = 0
                await self._top_up(pull_subject, inbox)
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
                    # cancellation of the task awaiting run().
                    async with asyncio.timeout(1.0):
                        msg = await self._queue.get()
                except TimeoutError:
                    # No heartbeat for a while: the pull died with a server restart.
                    if time.monotonic() - self._last_seen > 2 * _IDLE_HEARTBEAT + 1:
                        self._credit = 0
                        self._last_seen = time.monotonic()
                    continue
                if msg is None:
                    continue
                if self._stopping.is_set():
                    await self._give_back(msg)
                    break
                delivery = Delivery(msg, self.spec, self._park)
                task = asyncio.create_task(self._handle(delivery, msg))
                self._tasks.add(task)
                task.add_done_callback(self._on_done)
        finally:
            with contextlib.suppress(ValueError):
                self.bus.on_reconnect.remove(wake)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            while not self._queue.empty():
                queued = self._queue.get_nowait()
                if queued is not None:
                    await self._give_back(queued)
            await self._finish(grace)

    def _wake(self) -> None:
        self._queue.put_nowait(None)

    def _park(self, change: int) -> None:
        self._parked += change
        if change > 0:
            self._wake()  # room for another message now

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A freed slot may allow a new pull: wake the loop instead of waiting for its timer.
        self._queue.put_nowait(None)

    async def _give_back(self, msg: Msg) -> None:
        """A message received but never started: redeliver it now, not after ack_wait."""
        await _quietly(msg.nak())

    async def _finish(self, grace: float) -> None:
        """Let in-flight handlers end within ``grace`` seconds, then cancel the rest: their
        messages stay unacknowledged and are redelivered."""
        await finish(set(self._tasks), grace, then=UNWIND)

    async def _top_up(self, pull_subject: str, inbox: str) -> None:
        # Waiting handlers get slots of their own, up to PARKED_SHARE times as many as the
        # working ones: a bound (each holds a task and a heartbeat) far beyond any chain
        # of waiters behind one command.
        working = len(self._tasks) - min(self._parked, PARKED_SHARE * self.concurrency)
        room = self.concurrency - working - self._queue.qsize() - self._credit
        # Ask in chunks, not for every freed slot, to keep pull requests few.
        if room >= max(1, min(self.concurrency // 4, 64)) or (self._credit == 0 and room > 0):
            request = {
                "batch": room,
                "expires": int(_PULL_EXPIRES * 1e9),
                "idle_heartbeat": int(_IDLE_HEARTBEAT * 1e9),
            }
            try:
                await self.bus.nc.publish(pull_subject, json.dumps(request).encode(), reply=inbox)
            except Exception as e:
                log.debug("pull request failed: %s", e)
                await asyncio.sleep(0.5)
                return
            self._credit += room

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        status = (msg.headers or {}).get("Status")
        if status:
            if status in ("408", "409", "404"):
                # The pull ended (expired, or the server refused part of it): its remaining
                # credit is gone; Nats-Pending-Messages says how much.
                pending = (msg.headers or {}).get("Nats-Pending-Messages")
                self._credit = max(0, self._credit - int(pending)) if pending else 0
                self._queue.put_nowait(None)  # wake the loop to pull again at once
            return
        self._credit = max(0, self._credit - 1)
        self._queue.put_nowait(msg)

    async def _handle(self, delivery: Delivery, msg: Msg) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        try:
            if self.counted is not None and (delivery.last or delivery.spent):
                try:
                    delivery.count(await self.counted(delivery))
                except Exception as e:  # unknown now: never give up on a guess
                    log.debug("deliveries of seq %d not counted: %s", delivery.stream_seq, e)
                    delivery.count(1)
            if delivery.spent:
                await self._give_up(
                    delivery,
                    msg,
                    f"delivered {delivery.num_delivered} times (the process handling it "
                    "died or gave it back each time)",
                )
                return
            await self.handler(delivery)
        except Retry as e:
            await _quietly(msg.nak(delay=e.delay))
        except Reject as e:
            await self._dead_letter(delivery, str(e))
            await _quietly(msg.term())
        except (Abandon, asyncio.CancelledError):
            pass  # redelivered after ack_wait
        except Exception as e:
            log.exception(
                "handler failed on %s (delivery %d)", delivery.subject, delivery.num_delivered
            )
            if delivery.last:
                await self._give_up(delivery, msg, f"{type(e).__name__}: {e}")
            else:
                await _quietly(msg.nak(delay=self.spec.nak_delay(delivery.num_delivered)))
        else:
            await _quietly(msg.ack())
        finally:
            heartbeat.cancel()
            self.handled += 1

    async def _give_up(self, delivery: Delivery, msg: Msg, reason: str) -> None:
        """End the message's work (``on_give_up``), then dead-letter and terminate it. If
        its work cannot be ended now, the message is left to come back later."""
        if self.on_give_up is not None:
            try:
                await self.on_give_up(delivery, reason)
            except Exception as unfinished:
                log.error("not given up yet, left for a later delivery: %s", unfinished)
                return
        await self._dead_letter(delivery, reason)
        await _quietly(msg.term())

    async def _heartbeat(self, delivery: Delivery) -> None:
        # Five beats per ack wait: a busy event loop may delay one or two, never all.
        period = self.spec.ack_wait_of(delivery.num_delivered) / 5
        while True:
            await asyncio.sleep(period)
            await delivery.in_progress()

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        await dead_letter(
            self.bus,
            self.spec,
            delivery.subject,
            delivery.data,
            delivery.stream_seq,
            delivery.num_delivered,
            reason,
        )


async def dead_letter(
    bus: Bus,
    spec: ConsumerSpec,
    subject: str,
    data: bytes,
    stream_seq: int,
    deliveries: int,
    reason: str,
) -> None:
    """Copy a message that ``spec``'s consumer could not process to the dead letters, with
    the reason in its headers (`nats stream view VOLUMED_DEAD_LETTERS` shows them)."""
    headers = {
        "Volumed-Reason": reason[:1000],
        "Volumed-Subject": subject,
        "Volumed-Stream-Seq": str(stream_seq),
        "Volumed-Deliveries": str(deliveries),
    }
    # The same message dead-lettered twice (given up again after its first give-up's term
    # was lost) is stored once.
    headers["Nats-Msg-Id"] = f"{spec.stream}.{spec.durable}.{stream_seq}"
    try:
        await bus.js.publish(
            f"{DEAD_LETTER_PREFIX}.{spec.stream}.{spec.durable}", data, headers=headers
        )
    except Exception as e:  # the term still happens: a poison message must not loop
        log.error("could not dead-letter %s seq %d: %s", subject, stream_seq, e)
    log.warning("dead-lettered %s seq %d: %s", subject, stream_seq, reason)


async def _quietly(aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception as e:
        log.debug("ack/nak failed (the message will be redelivered): %s", e)
