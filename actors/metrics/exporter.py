"""The Prometheus endpoint: ``GET /metrics`` on ``VOLUMED_METRICS_ADDR``.

Started and closed by the supervisor. Besides serving what the actors of this process
count (``actors.metrics``), it derives the operation metrics from the public events (it
subscribes to ``volume.events.>``) and reads the server's numbers when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import msgspec
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from actors import metrics as m
from bus import Bucket, Bus
from bus.monitoring import consumer_lag, dead_letters
from bus.topology import EVENTS, EVENTS_PREFIX, HEALTH_BUCKET, TOPOLOGY, event_subject
from schemas.common import TERMINAL, epoch_of
from schemas.config import Settings
from schemas.events import OperationEvent
from schemas.internal import Heartbeat

log = logging.getLogger("volumed.metrics")

SCRAPE_TIMEOUT = 5.0
"""Seconds a scrape waits for the server's numbers; past it they are left out of it."""
HEARTBEAT_ACTORS = ("executor", "watcher", "correlator")
_REMEMBERED = 100_000  # operations kept in memory (ended ones, to count each once)
_CHECKS_PER_SCRAPE = 50  # stuck candidates looked up in the event stream per scrape


def parse_address(address: str) -> tuple[str | None, int]:
    """``host:port`` → (host, port); an empty host listens on every address."""
    host, _, port = address.rpartition(":")  # validated by Settings (ListenAddress)
    return (host.strip("[]") or None), int(port)


def _timestamp(at: str) -> float:
    parsed = epoch_of(at)
    return time.time() if parsed is None else parsed


@dataclass
class _Open:
    type: str
    status: str
    since: float  # `at` of the first event seen


class OperationsSeen:
    """Operations as the event stream shows them: counts each one's end once (the executor
    publishes an operation's latest event again when its command is re-sent), times it from
    its pending event, and keeps those not ended for the in-flight and stuck gauges."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._ended: OrderedDict[str, None] = OrderedDict()

    def event(self, e: OperationEvent) -> None:
        op = e.operation_id
        if op in self._ended or e.rejected_copy is not None:
            return  # (a rejected copy's event is another command's, not the operation's end)
        if e.status not in TERMINAL:
            seen = self._open.get(op)
            if seen is None:
                self._open[op] = _Open(e.type, e.status, _timestamp(e.at))
                if len(self._open) > _REMEMBERED:
                    self._open.popitem(last=False)
            else:
                seen.status = e.status
            return
        self._ended[op] = None
        if len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)
        m.OPERATIONS.labels(e.type, e.status, e.error.code if e.error else "").inc()
        started = self._open.pop(op, None)
        if started is not None:
            took = max(0.0, _timestamp(e.at) - started.since)
            m.OPERATION_SECONDS.labels(e.type, e.status).observe(took)

    def forget(self, operation_id: str) -> None:
        self._open.pop(operation_id, None)

    def stuck(self, now: float) -> list[str]:
        """Operations not ended STUCK_AFTER seconds after their first event, oldest first."""
        return [op for op, o in self._open.items() if now - o.since > m.STUCK_AFTER]

    def families(self, now: float) -> list[GaugeMetricFamily]:
        in_flight, stuck = m.OPERATIONS_IN_FLIGHT.gauge(), m.OPERATIONS_STUCK.gauge()
        by_status = Tally((o.type, o.status) for o in self._open.values())
        for (op_type, status), n in sorted(by_status.items()):
            in_flight.add_metric([op_type, status], n)
        old = Tally(o.type for o in self._open.values() if now - o.since > m.STUCK_AFTER)
        for op_type in sorted({o.type for o in self._open.values()} | set(old)):
            stuck.add_metric([op_type], old[op_type])
        return [in_flight, stuck]


class _Scraped(Collector):
    """The gauges read at scrape time, as the last refresh left them."""

    def __init__(self) -> None:
        self.families: list[GaugeMetricFamily] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return list(self.families)


class CannotListen(OSError):
    """An address to serve on (metrics, the REST API) is taken or not this host's: a
    configuration error."""


def bound_port(runner: web.AppRunner | None, asked: int) -> int:
    """The port ``runner`` listens on (the system's choice when 0 was asked), else ``asked``."""
    if runner is not None:
        for address in runner.addresses:
            return int(address[1])
    return asked


async def listen(
    app: web.Application, address: str, what: str, *, shutdown_timeout: float = 60.0
) -> web.AppRunner:
    """Serve ``app`` on ``address`` (host:port); CannotListen names ``what`` (the setting)
    when the address cannot be used, at start rather than later."""
    host, port = parse_address(address)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise CannotListen(f"cannot serve {what}={address}: {e.strerror or e}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class MetricsServer:
    """Serves ``/metrics`` until ``close``."""

    def __init__(self, bus: Bus, settings: Settings, address: str) -> None:
        self.bus = bus
        self.settings = settings
        self.address = address
        self.host, self._port = parse_address(address)
        self.operations = OperationsSeen()
        self._decoder = msgspec.json.Decoder(OperationEvent)
        self._scraped = _Scraped()
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._unsubscribe: Callable[[], Awaitable[None]] | None = None
        self._health: Bucket[Heartbeat] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen by the system when 0 was asked for)."""
        return bound_port(self._runner, self._port)

    async def start(self) -> None:
        """Listen (a port in use fails here, at start) and follow the event stream."""
        self._unsubscribe = await self.bus.subscribe(f"{EVENTS_PREFIX}.>", self._on_event)
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = await listen(app, self.address, "metrics on VOLUMED_METRICS_ADDR")
        log.info("metrics on http://%s:%d/metrics", self.host or "*", self.port)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            try:
                await self._unsubscribe()
            except Exception as e:  # the connection may be closing already
                log.debug("metrics: unsubscribe failed: %s", e)
            self._unsubscribe = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_event(self, subject: str, data: bytes, reply: str | None) -> None:
        # Not an operation event: not counted (persistence dead-letters those).
        with contextlib.suppress(msgspec.DecodeError):
            self.operations.event(self._decoder.decode(data))

    async def _serve(self, request: web.Request) -> web.Response:
        async with self._lock:  # one scrape at a time: its snapshot is read as it was made
            await self.refresh()
            body = self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format, the scraped ones as last refreshed."""
        return generate_latest(m.REGISTRY) + generate_latest(self._scraped)

    async def refresh(self) -> None:
        """Read the server's numbers (leaving them out when NATS does not answer in time)."""
        families: list[GaugeMetricFamily] = []
        up = m.SERVER_UP.gauge()
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                await self._check_stuck()
                families += await self._server_families()
            up.add_metric([], 1)
        except Exception as e:
            log.warning("metrics: the server's numbers are left out of this scrape: %r", e)
            up.add_metric([], 0)
        self._scraped.families = [*self.operations.families(time.time()), *families, up]

    async def _check_stuck(self) -> None:
        """An operation whose terminal event this process missed (it was disconnected, or
        started after the operation) is not stuck: the stream's newest event says."""
        for op in self.operations.stuck(time.time())[:_CHECKS_PER_SCRAPE]:
            newest = await self.bus.last_message(EVENTS.name, event_subject(op))
            if newest is None:
                self.operations.forget(op)  # aged out of the stream: nothing to follow
                continue
            try:
                self.operations.event(self._decoder.decode(newest))
            except msgspec.DecodeError:
                self.operations.forget(op)

    async def _server_families(self) -> list[GaugeMetricFamily]:
        pending, acks, redelivered = (
            m.CONSUMER_PENDING.gauge(),
            m.CONSUMER_ACK_PENDING.gauge(),
            m.CONSUMER_REDELIVERED.gauge(),
        )
        # Every consumer has a dead-letter count, 0 included: a rule sees the first dead
        # letter as a change, where a series that appears at 1 shows none.
        held: dict[tuple[str, str], int] = {}
        for c in await consumer_lag(self.bus, TOPOLOGY):
            pending.add_metric([c.stream, c.consumer], c.pending)
            acks.add_metric([c.stream, c.consumer], c.ack_pending)
            redelivered.add_metric([c.stream, c.consumer], c.redelivered)
            held[c.stream, c.consumer] = 0
        for d in await dead_letters(self.bus):
            held[d.stream, d.consumer] = d.messages
        dead = m.DEAD_LETTERS.gauge()
        for (stream, consumer), messages in sorted(held.items()):
            dead.add_metric([stream, consumer], messages)
        reporting = m.ACTORS_REPORTING.gauge()
        fresh = await self._fresh_heartbeats()
        for actor in HEARTBEAT_ACTORS:
            reporting.add_metric([actor], fresh[actor])
        return [pending, acks, redelivered, dead, reporting]

    async def _fresh_heartbeats(self) -> Tally[str]:
        """Instances per actor whose heartbeat is fresh: three missed make one stale."""
        if self._health is None:
            self._health = await self.bus.bucket(HEALTH_BUCKET, Heartbeat)
        stale_after = 3 * self.settings.heartbeat_interval
        now = time.time()
        fresh: Tally[str] = Tally()
        for key in await self._health.keys():
            try:
                got = await self._health.get(key)
            except msgspec.ValidationError:
                continue  # not a heartbeat
            if got is not None and now - got[0].at <= stale_after:
                fresh[got[0].actor] += 1
        return fresh
