"""The persistence actor: events into the database, queries and health out of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

from actors.logs import SECRETS
from actors.persistence.api import SERVICE_DESCRIPTION, SERVICE_NAME, SERVICE_VERSION, Api
from actors.persistence.batcher import Batcher
from actors.persistence.gate import WriteGate
from actors.persistence.health import HealthChecker
from actors.persistence.proofs import ProofHandler
from actors.persistence.read_after import ReadAfter
from actors.persistence.records import InvalidEvent, decode_event
from actors.persistence.store import Store, open_store
from bus import Abandon, Bus, Consumer, Delivery, Reject, serve
from bus.tasks import UNWIND, Backoff, finish
from bus.topology import CONFIG_SUBJECT, CREATES_SUBJECT, PERSISTENCE, PERSISTENCE_PROOFS
from schemas.config import Settings, mask_url_password, url_secrets
from schemas.internal import CloudStackCredentials, CreatesInDoubt, CreatesQuery

CREATES_WAIT = 10.0
"""Seconds a creates-in-doubt query waits at most for the database to hold every earlier
event (its asker waits CREATES_ASK_TIMEOUT for the answer, actors.executor.operations)."""

log = logging.getLogger("volumed.persistence")

# Handlers in flight at once; they wait for their batch, so this bounds the batch size.
CONCURRENCY = 2048
PROOF_CONCURRENCY = 4  # proofs of one VM supersede each other: a few at a time is plenty


class PersistenceActor:
    """Consumes every operation event into the database (the only writer), serves the
    ``volumed`` micro service's queries, and answers CloudStack credential requests.

    ``run`` goes on until cancelled: it opens the store (waiting out a database that is
    down), then consumes; on cancellation it takes no new events, lets the batches in
    flight commit, and closes the service and the store it opened. A store passed in is
    the caller's to close.
    """

    def __init__(
        self, bus: Bus, settings: Settings, store: Store | None = None, instance: str = ""
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.store = store
        self.instance = instance or settings.instance_name
        self.store_error = "connecting"
        self._owns_store = store is None
        self.batcher: Batcher | None = None
        self.consumer: Consumer | None = None
        self.proof_consumer: Consumer | None = None
        self.gate = WriteGate()
        self.gate.listeners.append(self._on_gate)
        self.proofs = ProofHandler(lambda: self.store, self.gate)
        self.health = HealthChecker(
            bus,
            lambda: self.store,
            lambda: self.store_error,
            stale_after=3 * settings.heartbeat_interval,
            gate=self.gate,
        )
        self.read_after = ReadAfter(bus, timeout=settings.query_wait)
        # The creates-in-doubt query must see every earlier event, whatever query_wait says
        # (0 turns the public queries' wait off): its own wait, bounded by its asker's.
        self.creates_read_after = ReadAfter(bus, timeout=CREATES_WAIT)
        self.store_open = asyncio.Event()
        if store is not None:
            self.store_open.set()
        self.api = Api(lambda: self.store, self.health, self.read_after, self.store_open)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish like a cancellation, but let ``run`` return normally."""
        self._stopping.set()
        for consumer in (self.consumer, self.proof_consumer):
            if consumer is not None:
                consumer.stop()

    async def run(self) -> None:
        service = None
        unsubscribe: Callable[[], Awaitable[None]] | None = None
        unsubscribe_creates: Callable[[], Awaitable[None]] | None = None
        batcher_task: asyncio.Task[None] | None = None
        try:
            # Health and queries answer while the database is still being waited for.
            service = await serve(
                self.bus, SERVICE_NAME, SERVICE_VERSION, SERVICE_DESCRIPTION, self.api.endpoints()
            )
            unsubscribe = await self.bus.subscribe(
                CONFIG_SUBJECT, self._on_config_request, queue="volumed-persistence"
            )
            unsubscribe_creates = await self.bus.subscribe(
                CREATES_SUBJECT, self._on_creates_request, queue="volumed-persistence"
            )
            if self.store is None:
                self.store = await self._open_store()
                if self.store is None:
                    return  # stopped while waiting for the database
                self.store_open.set()
            self.batcher = Batcher(self.store)
            batcher_task = asyncio.create_task(self.batcher.run(), name="persistence-batcher")
            self.consumer = Consumer(self.bus, PERSISTENCE, self._on_event, concurrency=CONCURRENCY)
            self.proof_consumer = Consumer(
                self.bus, PERSISTENCE_PROOFS, self.proofs.handle, concurrency=PROOF_CONCURRENCY
            )
            self._on_gate(self.gate.open)
            if self._stopping.is_set():
                self.stop()
            log.info("persistence %s consuming events into %s", self.instance, self.store.where)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(self.consumer))
                tg.create_task(self._consume(self.proof_consumer))
        finally:
            if self.batcher is not None and batcher_task is not None:
                await self.batcher.close(batcher_task)
            for unsub in (unsubscribe, unsubscribe_creates):
                if unsub is not None:
                    with contextlib.suppress(Exception):
                        await unsub()
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()
            await self.read_after.close()
            await self.creates_read_after.close()
            if self._owns_store and self.store is not None:
                await self.store.close()

    async def _consume(self, consumer: Consumer) -> None:
        """Run the consumer until it stops; on cancellation stop it and let its in-flight
        handlers finish (they wait for the batcher, which is closed only after)."""
        task = asyncio.create_task(consumer.run(), name="persistence-consumer")
        try:
            # Not awaited directly: a cancellation delivered into the consumer's own
            # wait_for can be swallowed on Python 3.11, so it is told to stop instead.
            await asyncio.wait({task})
        except asyncio.CancelledError:
            consumer.stop()
            # Cancelled by the supervisor once its grace is up: no longer than its UNWIND.
            await finish([task], UNWIND / 2, then=UNWIND / 2)
            raise
        task.result()

    async def _open_store(self) -> Store | None:
        where = mask_url_password(self.settings.db_dsn)
        backoff = Backoff(0.5, 10.0)
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            try:
                store = await open_store(self.settings.db_dsn)
            except Exception as e:
                self.store_error = str(e) or type(e).__name__
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "cannot open the database (%s); retrying, at most every %.0f s",
                        self.store_error,
                        backoff.cap,
                    )
                await backoff.pause(self._stopping)
                continue
            self.store_error = ""
            log.info("database %s open", where)
            return store
        return None

    async def _on_event(self, delivery: Delivery) -> None:
        try:
            event = decode_event(delivery.subject, delivery.data)
        except InvalidEvent as e:
            raise Reject(str(e)) from None
        batcher = self.batcher
        if batcher is None:
            raise Abandon("not consuming yet")
        await self.gate.write(lambda: batcher.submit(event))

    def _on_gate(self, opened: bool) -> None:
        """While the database refuses writes, each consumer takes one message at a time (the
        gate's probe), instead of pulling and giving back the whole backlog every pause; a
        consumer reads its concurrency before each pull."""
        for consumer, concurrency in (
            (self.consumer, CONCURRENCY),
            (self.proof_consumer, PROOF_CONCURRENCY),
        ):
            if consumer is not None:
                consumer.concurrency = concurrency if opened else 1

    async def _on_creates_request(self, subject: str, data: bytes, reply: str | None) -> None:
        """The creates in doubt (CreatesQuery), from the database once it holds every event
        published before the query: the asker's twin stored its ``executing`` event before
        it sent createVolume, so it is there. Unless that is proven, an error: the asker then
        cannot tell, and adopts nothing."""
        if not reply:
            return
        try:
            query = msgspec.json.decode(data, type=CreatesQuery)
            store = self.store
            if store is None:
                answer = CreatesInDoubt(error=f"the database is not available: {self.store_error}")
            elif not await self.creates_read_after.wait():
                answer = CreatesInDoubt(error="the database is behind the events stream")
            else:
                answer = CreatesInDoubt(operations=await store.creates_in_doubt(query))
        except Exception as e:
            answer = CreatesInDoubt(error=f"{type(e).__name__}: {e}")
        try:
            await self.bus.respond(reply, answer)
        except Exception as e:
            log.warning("cannot answer a creates-in-doubt query: %s", e)

    async def _on_config_request(self, subject: str, data: bytes, reply: str | None) -> None:
        if not reply:
            return
        store = self.store
        if store is None:
            answer = CloudStackCredentials(
                error=f"the database is not available yet: {self.store_error}", transient=True
            )
        else:
            try:
                answer = await store.cloudstack_credentials()
            except Exception as e:
                answer = CloudStackCredentials(
                    error=f"cannot read ossea_configs: {e}", transient=True
                )
            # Masked in this process's log from now on, whatever form they take in it.
            SECRETS.add(answer.secret, *url_secrets(answer.endpoint or ""))
        try:
            await self.bus.respond(reply, answer)
        except Exception as e:
            log.warning("cannot answer a credentials request: %s", e)
