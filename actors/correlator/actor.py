"""The correlator of one VM: feeds the engine from the bus and publishes its decisions.

Inputs, all for this VM:
- device events on ``device_subject(vm_id)`` (core subscription), after the watcher's last
  state from the devices bucket (key: vm id) so that the devices present at start are known;
- the executor's operation events on ``volume.events.>`` (core subscription): an attach to
  this VM that is ``executing`` may own a device before its request arrives;
- the attaches in flight at start (and after a NATS reconnect), read from the attaching
  bucket (AttachInFlight, written by the executor): until they are known no device without
  serial is mapped;
- CorrelateRequest / ReleaseRequest from the durable ``correlator_consumer(vm_id)``; a
  request is acknowledged only after its decision is published.

Output besides the decisions: a ``MappingProof`` on ``proof_subject(vm_id)`` whenever the
devices may no longer be what the database's mappings name (once the device state is known
at start, after every device that appears, goes or changes, and every
``REPROVE_INTERVAL`` as reconciliation): the VM's mappings are read from the
``vm_volumes`` query and each is proven again by the engine, or names no device.

The engine is synchronous and only ever called from this event loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from actors.correlator.engine import CorrelationEngine, Decision, InFlightAttach
from actors.heartbeat import beat
from actors.logs import bind
from actors.metrics import ATTACHES_WAITING, CORRELATION_SECONDS, CORRELATIONS
from bus import Bus, Consumer, Delivery, Reject, Retry, ask
from bus.tasks import Backoff
from bus.topology import (
    API_VM_VOLUMES,
    ATTACHING_BUCKET,
    DEVICES_BUCKET,
    EVENTS_PREFIX,
    REPROVE_SUBJECT,
    Topology,
    correlate_result_subject,
    correlator_consumer,
    device_subject,
    proof_subject,
    release_result_subject,
)
from schemas.common import epoch_of
from schemas.config import Settings
from schemas.devices import (
    DeviceEvent,
    DeviceInfo,
    MappedVolume,
    MappingProof,
    ProvenMapping,
)
from schemas.events import OperationEvent
from schemas.internal import (
    AttachInFlight,
    CheckResult,
    CorrelateRequest,
    CorrelateResult,
    ReleaseRequest,
)
from schemas.queries import VmVolumesQuery

log = logging.getLogger("volumed.correlator")

_IDLE_WAKE = 1.0  # seconds between checks for a NATS reconnect when nothing is due
_SCAN_CONCURRENCY = 64
REPROVE_INTERVAL = 30.0
"""Seconds between re-proofs of the VM's mappings when no device changed (reconciliation:
catches a mapping recorded after the last proof, e.g. one persistence wrote late)."""
_QUERY_TIMEOUT = 5.0


class PublishFailed(Exception):
    """The decision could not be published; the request is redelivered and answered again."""


class CorrelatorActor:
    """Maps this VM's attaches to its block devices (see ``engine`` for the rules)."""

    def __init__(self, bus: Bus, settings: Settings, vm_id: str, instance: str = "") -> None:
        self.bus = bus
        self.settings = settings
        self.vm_id = vm_id
        self.instance = instance or settings.instance_name
        self.engine = CorrelationEngine(vm_id, now=time.time())  # replaced in run()
        self._attach_decoder = msgspec.json.Decoder(CorrelateRequest)
        self._release_decoder = msgspec.json.Decoder(ReleaseRequest)
        self._device_decoder = msgspec.json.Decoder(DeviceEvent)
        self._event_decoder = msgspec.json.Decoder(OperationEvent)
        self._waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._buffer: list[DeviceEvent] | None = []  # device events until the state is read
        self._wake = asyncio.Event()
        self._need_sync = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._reprove = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: Consumer | None = None
        self.device_state_known = False
        self.device_state_loads = 0  # the watcher's saved state read (start, reconnects)
        self.published = 0
        self.proofs_published = 0
        self.proof_error: str | None = None
        self._last_proof: tuple[ProvenMapping, ...] = ()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled or ``stop()``; requests still waiting are handed back."""
        s = self.settings
        spec = correlator_consumer(self.vm_id)
        await self.bus.provision(Topology(consumers=(spec,)))
        # Listen before reading any state, so that nothing falls between the two.
        self.engine = CorrelationEngine(
            self.vm_id,
            now=time.time(),
            timeout=s.correlation_timeout,
            release_timeout=s.detach_timeout,
            horizon=s.cloudstack_job_timeout + s.correlation_timeout + 60.0,
            linger=max(5.0, 2 * s.poll_interval + 1.0),
            # The watcher of this VM runs on this host: its device stamps are on this clock.
            clock=s.clock,
        )
        unsubscribe = [
            await self.bus.subscribe(device_subject(self.vm_id), self._on_device),
            await self.bus.subscribe(f"{EVENTS_PREFIX}.>", self._on_operation_event),
            await self.bus.subscribe(REPROVE_SUBJECT, self._on_reprove),
        ]
        self._consumer = Consumer(self.bus, spec, self._handle, concurrency=256)
        try:
            await self._load_device_state()
            self._need_sync.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consumer.run(grace=1.0))
                tg.create_task(self._clock())
                tg.create_task(self._sync_loop())
                tg.create_task(self._heartbeat_loop())
                tg.create_task(self._proof_loop())
        finally:
            self._consumer.stop()
            for unsub in unsubscribe:
                with contextlib.suppress(Exception):
                    await unsub()
            for task in list(self._tasks):
                task.cancel()

    def stop(self) -> None:
        """Take no new requests and end ``run``; unanswered ones are redelivered later."""
        self._stopping.set()
        self._wake.set()
        self._need_sync.set()
        self._beat_now.set()
        self._reprove.set()
        if self._consumer is not None:
            self._consumer.stop()

    # -- inputs ---------------------------------------------------------------------------

    async def _on_device(self, subject: str, data: bytes, reply: str | None) -> None:
        try:
            event = self._device_decoder.decode(data)
        except msgspec.DecodeError as e:
            log.warning("ignoring an undecodable device event on %s: %s", subject, e)
            return
        if self._buffer is not None:
            self._buffer.append(event)
            return
        self._device_event(event, time.time())

    def _device_event(self, event: DeviceEvent, now: float) -> None:
        if event.kind == "inventory":
            self.device_state_known = True
        self._apply(self.engine.device_event(event, now))
        # A device came, went or changed: the mappings may name another disk now.
        self._reprove.set()

    async def _on_operation_event(self, subject: str, data: bytes, reply: str | None) -> None:
        try:
            event = self._event_decoder.decode(data)
        except msgspec.DecodeError:
            return  # not ours to judge: persistence dead-letters bad events
        if event.type == "attach":
            self._apply(self.engine.operation_event(event, time.time()))
            if event.status == "completed" and event.vm_id == self.vm_id:
                # A new mapping: proven again (with the proof recorded) once it is stored.
                self._reprove.set()

    async def _on_reprove(self, subject: str, data: bytes, reply: str | None) -> None:
        """Asked to prove the mappings again now (the REST gateway's force-sync)."""
        self._reprove.set()
        if reply:
            with contextlib.suppress(Exception):  # the asker may be gone: nothing to tell
                await self.bus.respond(reply, {"vm_id": self.vm_id, "correlator": self.instance})

    async def _handle(self, delivery: Delivery) -> None:
        kind = delivery.subject.rsplit(".", 1)[-1]
        now = time.time()
        try:
            if kind == "attach":
                attach = self._attach_decoder.decode(delivery.data)
                if attach.vm_id != self.vm_id:
                    raise Reject(
                        f"attach for VM {attach.vm_id} reached the correlator of {self.vm_id}"
                    )
                bind(operation_id=attach.operation_id, volume_id=attach.volume_id)
                key = ("attach", attach.operation_id)
                waiter = self._waiter(key)
                self._apply(self.engine.attach(attach, now))
            elif kind == "detach":
                release = self._release_decoder.decode(delivery.data)
                bind(operation_id=release.operation_id, volume_id=release.volume_id)
                key = ("detach", release.operation_id)
                waiter = self._waiter(key)
                self._apply(self.engine.release(release, now))
            else:
                raise Reject(f"unexpected subject {delivery.subject}")
        except msgspec.DecodeError as e:
            raise Reject(f"undecodable {kind} request: {e}") from None
        try:
            await asyncio.shield(waiter)
        except PublishFailed as e:
            raise Retry(str(e), delay=1.0) from None

    def _waiter(self, key: tuple[str, str]) -> asyncio.Future[None]:
        waiter = self._waiters.get(key)
        if waiter is None or waiter.done():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[key] = waiter
        return waiter

    # -- decisions ------------------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, CorrelateResult):
                self._count(decision)
            self._spawn(self._publish(decision))
        self._wake.set()  # the next deadline may have changed
        ATTACHES_WAITING.set(self.engine.attaches_waiting)

    def _count(self, decision: CorrelateResult) -> None:
        """The decision in the metrics: its result, and for a device found, how long after
        the device appeared (the watcher's time, on this host's clock)."""
        if decision.error is not None:
            CORRELATIONS.labels(decision.error.code).inc()
            return
        CORRELATIONS.labels(decision.proof or "unknown").inc()
        device = self.engine.mapping(decision.volume_id)
        if device is not None and device.appeared_at > 0:
            CORRELATION_SECONDS.observe(max(0.0, time.time() - device.appeared_at))

    async def _publish(self, decision: Decision) -> None:
        about = {"operation_id": decision.operation_id, "volume_id": decision.volume_id}
        if isinstance(decision, CorrelateResult):
            subject = correlate_result_subject(decision.operation_id)
            key = ("attach", decision.operation_id)
            if decision.error is None:
                log.info(
                    "attach %s: volume %s is %s (proof: %s)",
                    decision.operation_id,
                    decision.volume_id,
                    decision.device_path,
                    decision.proof,
                    extra=about,
                )
            else:
                log.warning(
                    "attach %s: volume %s not mapped: %s: %s",
                    decision.operation_id,
                    decision.volume_id,
                    decision.error.code,
                    decision.error.message,
                    extra=about,
                )
        else:
            subject = release_result_subject(decision.operation_id)
            key = ("detach", decision.operation_id)
            log.info(
                "detach %s: device of volume %s gone=%s %s",
                decision.operation_id,
                decision.volume_id,
                decision.gone,
                decision.message,
                extra=about,
            )
        error: Exception | None = None
        try:
            await self.bus.publish(subject, decision)
            self.published += 1
        except Exception as e:
            log.warning(
                "could not publish the decision for %s: %s", decision.operation_id, e, extra=about
            )
            error = PublishFailed(f"publishing to {subject} failed: {e}")
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # -- time, state, health --------------------------------------------------------------

    async def _clock(self) -> None:
        """Tick at the engine's next deadline (never while idle), and notice reconnects."""
        reconnects = self.bus.reconnects
        while not self._stopping.is_set():
            deadline = self.engine.next_deadline()
            delay = _IDLE_WAKE if deadline is None else deadline - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(delay, _IDLE_WAKE))
            self._wake.clear()
            if self.bus.reconnects != reconnects:
                reconnects = self.bus.reconnects
                # Events may have been lost while disconnected: attaches that started then
                # are unknown until the records are read again, and so are device changes
                # (the watcher's saved state is read again). A reconnect is no restart: what
                # was proven stays proven, as long as the watcher still reports the same
                # appearances (see the engine's "Inventories").
                self.engine.lose_track("NATS reconnected", time.time())
                self._need_sync.set()
            now = time.time()
            if deadline is not None and deadline <= now:
                self._apply(self.engine.tick(now))

    async def _sync_loop(self) -> None:
        """Read the attaches in flight (and the device state) whenever they may be unknown."""
        backoff = Backoff(0.2, 5.0)
        while not self._stopping.is_set():
            await self._need_sync.wait()
            if self._stopping.is_set():
                return
            self._need_sync.clear()
            try:
                if self._buffer is None:
                    await self._load_device_state()
                in_flight = await self._read_in_flight()
            except Exception as e:
                log.warning("cannot read the attaches in flight (%s); retrying", e)
                await backoff.pause()
                self._need_sync.set()
                continue
            backoff = Backoff(0.2, 5.0)
            log.info("attaches in flight to VM %s: %d", self.vm_id, len(in_flight))
            self._apply(self.engine.sync_attaches(in_flight, time.time()))
            self._beat_now.set()

    async def _read_in_flight(self) -> list[InFlightAttach]:
        """Attaches to this VM that may be running in CloudStack, from the attaching bucket
        (the executor puts one before an attach turns executing, deletes it once over)."""
        attaching = await self.bus.bucket(ATTACHING_BUCKET, AttachInFlight)
        keys = await attaching.keys()
        found: list[InFlightAttach] = []
        sem = asyncio.Semaphore(_SCAN_CONCURRENCY)

        async def one(key: str) -> None:
            async with sem:
                try:
                    got = await attaching.get(key)
                except msgspec.MsgspecError:
                    # Unreadable: it might be an attach to this VM, so it counts as one.
                    found.append(InFlightAttach(operation_id=key))
                    return
            if got is None or got[0].vm_id != self.vm_id:
                return
            a = got[0]
            # Its device cannot appear before the attach was sent; the earliest time known
            # (accepted, else sent) is the safe window start.
            # (An unreadable time: since an unknown time.)
            accepted = (epoch_of(a.accepted_at) or -math.inf) if a.accepted_at else None
            times = [t for t in (accepted, a.started_at) if t is not None]
            found.append(
                InFlightAttach(
                    operation_id=a.operation_id,
                    volume_id=a.volume_id,
                    started_at=min(times) if times else float("-inf"),
                    clock=a.clock,
                )
            )

        await asyncio.gather(*(one(k) for k in keys))
        return found

    async def _load_device_state(self) -> None:
        """Apply the watcher's last device list, then the events that came meanwhile."""
        state: DeviceEvent | None = None
        try:
            devices = await self.bus.bucket(DEVICES_BUCKET, msgspec.Raw)
            got = await devices.get(self.vm_id)
            if got is not None:
                state = _saved_state(bytes(got[0]))
        except Exception as e:
            log.warning(
                "cannot read the device state of VM %s (%s); waiting for the watcher's inventory",
                self.vm_id,
                e,
            )
        now = time.time()
        if state is not None and state.at < (booted := boot_time()):
            # Saved before this host booted: the kernel has named its disks again since,
            # so nothing is known (or proven) from it; the watcher's inventory will come.
            log.info(
                "the saved device state of VM %s predates this boot (%.0f s before); "
                "waiting for the watcher",
                self.vm_id,
                booted - state.at,
            )
            state = None
        self.device_state_loads += 1
        if state is not None:
            self._device_event(state, now)
        elif self._buffer is not None:
            log.info("no device state for VM %s yet; waiting for the watcher", self.vm_id)
        buffered, self._buffer = self._buffer or [], None
        for event in buffered:
            self._device_event(event, now)

    # -- mapping proofs -------------------------------------------------------------------

    async def _proof_loop(self) -> None:
        """Prove the VM's mappings again whenever asked to, and every REPROVE_INTERVAL."""
        backoff = Backoff(0.2, 5.0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reprove.wait(), REPROVE_INTERVAL)
            if self._stopping.is_set():
                return
            self._reprove.clear()
            if not self.device_state_known:
                # Against no device list every mapping would be dropped; the list's arrival
                # asks again.
                continue
            try:
                await self._publish_proof()
            except Exception as e:
                self.proof_error = f"{type(e).__name__}: {e}"
                log.warning("cannot prove the mappings of VM %s (%s); retrying", self.vm_id, e)
                self._reprove.set()
                await backoff.pause()
                continue
            self.proof_error = None
            backoff = Backoff(0.2, 5.0)

    async def _publish_proof(self) -> None:
        # A query error (503 while the database is not open) raises with its reason.
        reply = await ask(
            self.bus, API_VM_VOLUMES, VmVolumesQuery(vm_id=self.vm_id), timeout=_QUERY_TIMEOUT
        )
        mapped = [
            MappedVolume(
                volume_id=m.volume_id, operation_id=m.operation_id, device_path=m.device_path
            )
            for m in reply.volumes
        ]
        if not mapped:
            return
        # The engine's state now, after the query: a mapping is proven against the newest
        # device list, never against one older than the rows.
        now = time.time()
        proof = MappingProof(
            vm_id=self.vm_id,
            at=now,
            correlator=self.instance,
            mappings=tuple(self.engine.prove(mapped)),
        )
        await self.bus.publish(proof_subject(self.vm_id), proof)
        self.proofs_published += 1
        if proof.mappings == self._last_proof:
            return  # reconciliation found nothing new: logged once is enough
        self._last_proof = proof.mappings
        for p in proof.mappings:
            if p.proof == "none":
                log.warning(
                    "volume %s names no device: %s",
                    p.volume_id,
                    p.reason,
                    extra={"operation_id": p.operation_id, "volume_id": p.volume_id},
                )
        log.info(
            "mappings of VM %s proven: %s",
            self.vm_id,
            ", ".join(f"{p.volume_id}={p.device_path or '-'}" for p in proof.mappings),
        )

    def checks(self) -> dict[str, CheckResult]:
        """This correlator's own health checks; ``correlator`` sums them up (health requires
        it, so a VM whose correlator is not running is reported, not silently ``ok``)."""
        e = self.engine
        parts = {
            "device_state": CheckResult(
                status="ok" if self.device_state_known else "degraded",
                detail=f"{len(e.devices())} devices known"
                if self.device_state_known
                else "no device list from the watcher yet",
            ),
            "attach_tracking": CheckResult(
                status="ok" if e.attaches_known else "degraded",
                detail="attaches in flight are known"
                if e.attaches_known
                else "attaches in flight not known yet: devices without serial wait",
            ),
            "mapping_proofs": CheckResult(
                status="ok" if self.proof_error is None else "degraded",
                detail=f"{self.proofs_published} published"
                if self.proof_error is None
                else f"cannot prove the mappings again: {self.proof_error}",
            ),
            "requests": CheckResult(status="ok", detail=f"{e.waiting} waiting"),
        }
        problems = [f"{n}: {c.detail}" for n, c in parts.items() if c.status != "ok"]
        parts["correlator"] = CheckResult(
            status="degraded" if problems else "ok",
            detail=f"VM {self.vm_id}: " + ("; ".join(problems) if problems else "running"),
        )
        return parts

    async def _heartbeat_loop(self) -> None:
        async def checks() -> dict[str, CheckResult]:
            return self.checks()

        await beat(
            self.bus,
            "correlator",
            self.instance,
            self.settings.heartbeat_interval,
            checks,
            now=self._beat_now,
            stop=self._stopping,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _SavedDevices(msgspec.Struct, kw_only=True):
    """The watcher's saved device list, as far as the correlator needs it."""

    vm_id: str
    at: float
    devices: tuple[DeviceInfo, ...] = ()
    watcher: str = ""
    unread: tuple[str, ...] = ()


def _saved_state(raw: bytes) -> DeviceEvent:
    """The devices bucket's value (a DeviceEvent inventory or the watcher's snapshot) as an
    inventory. Marked as a start scan (a gap nobody here watched): the engine takes a device
    it first learns from it as appeared when the watcher's stamps say, and only if the
    watcher says (``appeared_after``; a watcher's start scan: "before it started"), and a
    device it knows with the same stamps as that same appearance (read again after a NATS
    reconnect: its proof stands)."""
    try:
        event = msgspec.json.decode(raw, type=DeviceEvent)
    except msgspec.ValidationError:
        saved = msgspec.json.decode(raw, type=_SavedDevices)
    else:
        if event.kind != "inventory":
            raise ValueError(f"the saved device state is an {event.kind!r} event")
        saved = _SavedDevices(
            vm_id=event.vm_id,
            at=event.at,
            devices=event.devices,
            watcher=event.watcher,
            unread=event.unread,
        )
    return DeviceEvent(
        kind="inventory",
        vm_id=saved.vm_id,
        at=saved.at,
        source="start",
        devices=saved.devices,
        unread=saved.unread,
        watcher=saved.watcher,
    )


def boot_time(stat: str = "/proc/stat") -> float:
    """When this host booted (time.time() scale), from the kernel's ``btime``; 0 unknown."""
    try:
        with open(stat) as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0
