"""The supervisor: owns the NATS connection and every actor task of one process.

If one actor fails, all stop and the error is raised; SIGTERM/SIGINT stops them gracefully
(no new messages, in-flight ones finished within a grace period or left unacknowledged for
redelivery), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from actors.logs import bind
from actors.metrics import ACTOR_UP
from bus import Bus
from bus.tasks import GRACE, UNWIND, Backoff, finish
from bus.topology import CONFIG_SUBJECT, topology_for
from schemas.config import Settings
from schemas.internal import CloudStackCredentials

if TYPE_CHECKING:
    from actors.metrics.exporter import MetricsServer
    from actors.signals import StopSignals

log = logging.getLogger("volumed.supervisor")

ACTORS = ("persistence", "executor", "correlator", "watcher")
# Not one of the default actors: it serves callers of the Go daemon's REST API, for which
# VOLUMED_HTTP_ADDR asks (default_actors), or `volumed run gateway`.
GATEWAY = "gateway"
RUNNABLE = (*ACTORS, GATEWAY)


class Actor(Protocol):
    """What the supervisor runs: ``run`` until ``stop`` (or a failure); after ``stop`` it
    takes no new work, finishes what it holds within bus.tasks.GRACE and returns."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def resolve_vm_id(bus: Bus, settings: Settings) -> str:
    """VOLUMED_VM_ID, else ossea_configs.oma_vm_id through the persistence actor (waiting
    for it: the watcher and correlator cannot know their VM without it)."""
    if settings.vm_id:
        return settings.vm_id
    backoff = Backoff(0.2, 10.0)
    while True:
        try:
            data = await bus.request(CONFIG_SUBJECT, b"{}", timeout=2.0)
            creds = msgspec.json.decode(data, type=CloudStackCredentials)
            if creds.vm_id:
                return creds.vm_id
            reason = creds.error or "the active ossea_configs row has no oma_vm_id"
        except Exception as e:
            reason = f"no answer from the persistence actor ({type(e).__name__})"
        log.warning("local VM id unknown: %s; set VOLUMED_VM_ID. Retrying.", reason)
        await backoff.pause()


def connect_bus(settings: Settings, name: str) -> Coroutine[Any, Any, Bus]:
    """The daemon's connection: Bus.connect_with, retrying for ever."""
    return Bus.connect_with(settings, name)


async def provision(settings: Settings) -> None:
    """Create or update the streams, consumers and buckets, then return: `volumed provision`,
    run once by a user that may (admin) before least-privilege actors start."""
    bus = await connect_bus(settings, f"volumed-provision-{settings.instance_name}")
    try:
        await bus.provision(topology_for(settings), replicas=settings.stream_replicas)
    finally:
        await bus.close()


def default_actors(settings: Settings) -> list[str]:
    """What `volumed run` without names runs: every actor, and the REST gateway when
    VOLUMED_HTTP_ADDR is set."""
    return [*ACTORS, GATEWAY] if settings.http_addr else list(ACTORS)


def build(name: str, bus: Bus, settings: Settings, instance: str, vm_id: str | None) -> Actor:
    # Imported here so that `volumed run executor` does not load the watcher's netlink code.
    if name == GATEWAY:
        from actors.gateway import GatewayActor

        return GatewayActor(bus, settings)
    if name == "executor":
        from actors.executor import ExecutorActor

        return ExecutorActor(bus, settings, instance)
    if name == "persistence":
        from actors.persistence import PersistenceActor

        return PersistenceActor(bus, settings, instance=instance)
    assert vm_id is not None
    if name == "watcher":
        from actors.watcher import WatcherActor

        return WatcherActor(
            bus, settings, vm_id, instance, heartbeat_interval=settings.heartbeat_interval
        )
    if name == "correlator":
        from actors.correlator import CorrelatorActor

        return CorrelatorActor(bus, settings, vm_id, instance)
    raise ValueError(f"unknown actor {name!r}; choose from {', '.join(RUNNABLE)}")


class Supervisor:
    def __init__(self, settings: Settings, actors: Sequence[str] = ACTORS) -> None:
        unknown = [a for a in actors if a not in RUNNABLE]
        if unknown:
            raise ValueError(
                f"unknown actor(s) {', '.join(unknown)}; choose from {', '.join(RUNNABLE)}"
            )
        self.settings = settings
        self.names = list(dict.fromkeys(actors))
        self.instance = settings.instance_name
        self.actors: dict[str, Actor] = {}
        self.bus: Bus | None = None
        self.metrics: MetricsServer | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if self._stop.is_set():  # stopped before it started: not even a connection
            return
        stop = asyncio.create_task(self._stop.wait())
        connect = asyncio.create_task(connect_bus(self.settings, f"volumed-{self.instance}"))
        # NATS may be down at start (connect waits for it): a signal must still end us.
        await asyncio.wait([stop, connect], return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connect
            return
        bus = self.bus = connect.result()
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            if self.settings.nats_provision:
                await bus.provision(
                    topology_for(self.settings), replicas=self.settings.stream_replicas
                )
            if self.settings.metrics_addr:
                # Before the actors: a port in use stops the process at start, not later.
                from actors.metrics.exporter import MetricsServer

                self.metrics = MetricsServer(bus, self.settings, self.settings.metrics_addr)
                await self.metrics.start()
            for name in sorted(self.names, key=RUNNABLE.index):
                tasks[name] = asyncio.create_task(self._run_actor(name, bus), name=name)
            log.info("volumed running: %s (instance %s)", ", ".join(self.names), self.instance)
            self.ready.set()
            done, _ = await asyncio.wait(
                [stop, *tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                if t is not stop and t.exception() is not None:
                    log.error("actor %s failed: %r; stopping all", t.get_name(), t.exception())
        finally:
            stop.cancel()
            await self._shutdown(tasks)
            if self.metrics is not None:
                await self.metrics.close()
            await bus.close()
        for t in tasks.values():
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _run_actor(self, name: str, bus: Bus) -> None:
        ACTOR_UP.labels(name).set(0)  # present, and down, until it runs
        bind(actor=name)  # every line of this actor's tasks names it
        vm_id = None
        if name in ("watcher", "correlator"):
            # Waits for the persistence actor when the VM id comes from ossea_configs.
            vm_id = await resolve_vm_id(bus, self.settings)
        actor = build(name, bus, self.settings, self.instance, vm_id)
        self.actors[name] = actor
        up = ACTOR_UP.labels(name)
        up.set(1)
        try:
            await actor.run()
        finally:
            up.set(0)

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        """Two phases: ask the actors to stop and wait GRACE, then cancel the rest."""
        # The gateway first: no new request starts a command while the others stop.
        for name in (GATEWAY, "executor", "correlator", "watcher", "persistence"):
            actor = self.actors.get(name)
            if name not in tasks:
                continue
            if actor is not None:
                actor.stop()  # finishes in-flight work, takes no more
            else:
                tasks[name].cancel()  # not built yet (waiting for its VM id): holds nothing
        await finish(tasks.values(), GRACE, then=UNWIND)


async def run_until_signalled(
    settings: Settings, actors: Sequence[str], signals: StopSignals
) -> None:
    """Run ``actors`` until SIGTERM or SIGINT, caught by ``signals`` (from the entry point's
    first line: one that came during start-up stops at once)."""
    supervisor = Supervisor(settings, actors)
    signals.notify(asyncio.get_running_loop(), supervisor.stop)
    await supervisor.run()
