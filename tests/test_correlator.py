"""The correlator actor against a real nats-server: device events and requests in, the
decisions out on the correlation result subjects."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.correlator import CorrelatorActor
from actors.correlator.actor import boot_time
from actors.watcher import WatcherActor
from bus import Bus
from bus.topology import (
    ATTACHING_BUCKET,
    CORRELATED_PREFIX,
    DEAD_LETTERS,
    DEVICES_BUCKET,
    HEALTH_BUCKET,
    TOPOLOGY,
    correlate_request_subject,
    device_subject,
    event_subject,
    release_request_subject,
)
from schemas.common import GIB, serial_of
from schemas.config import Settings
from schemas.devices import DeviceEvent, DeviceInfo, DeviceSnapshot, MappedVolume
from schemas.events import OperationEvent
from schemas.internal import (
    AttachInFlight,
    CorrelateRequest,
    CorrelateResult,
    Heartbeat,
    ReleaseRequest,
    ReleaseResult,
)
from tests.conftest import NatsServer, wait_for
from tests.test_watcher import FakeHost

VM = "7c4b1c2e-0000-4000-8000-00000000c0de"
HERE = Settings().clock  # an executor on this host stamps its times with it
THERE = "boot-id-of-another-host"


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, "test-correlator")
    await b.provision(TOPOLOGY)
    yield b
    await b.close()


class Results:
    """Every decision the correlator publishes, by operation id (subscribed before use)."""

    def __init__(self) -> None:
        self.attach: dict[str, CorrelateResult] = {}
        self.release: dict[str, ReleaseResult] = {}
        self.arrived: dict[str, float] = {}

    async def start(self, bus: Bus) -> None:
        async def on(subject: str, data: bytes, reply: str | None) -> None:
            op, kind = subject.removeprefix(CORRELATED_PREFIX + ".").rsplit(".", 1)
            self.arrived.setdefault(op, time.time())
            if kind == "attach":
                self.attach[op] = msgspec.json.decode(data, type=CorrelateResult)
            else:
                self.release[op] = msgspec.json.decode(data, type=ReleaseResult)

        await bus.subscribe(f"{CORRELATED_PREFIX}.>", on)


@pytest.fixture
async def results(bus: Bus) -> Results:
    r = Results()
    await r.start(bus)
    return r


async def start(bus: Bus, **settings: Any) -> tuple[CorrelatorActor, asyncio.Task[None]]:
    actor = CorrelatorActor(bus, Settings(**settings), VM, instance="test")
    task = asyncio.create_task(actor.run())
    await wait_for(lambda: actor.engine.attaches_known, timeout=5)
    return actor, task


async def stop(actor: CorrelatorActor, task: asyncio.Task[None]) -> None:
    actor.stop()
    await asyncio.wait_for(task, 10)


def dev(name: str, size: int, serial: str | None, at: float) -> DeviceInfo:
    return DeviceInfo(name=name, path=f"/dev/{name}", size=size, serial=serial, appeared_at=at)


async def device_added(bus: Bus, info: DeviceInfo) -> None:
    event = DeviceEvent(kind="added", vm_id=VM, at=info.appeared_at, source="uevent", device=info)
    await bus.publish(device_subject(VM), event)


async def watcher_started(bus: Bus, *devices: DeviceInfo) -> None:
    """The watcher's start inventory, now."""
    inv = DeviceEvent(kind="inventory", vm_id=VM, at=time.time(), source="start", devices=devices)
    await bus.publish(device_subject(VM), inv)


def attach_request(
    op: str, volume_id: str, size: int, started_at: float, clock: str | None = HERE
) -> CorrelateRequest:
    return CorrelateRequest(
        operation_id=op,
        volume_id=volume_id,
        vm_id=VM,
        size=size,
        serial=serial_of(volume_id),
        started_at=started_at,
        clock=clock,
    )


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


async def test_serial_device_already_in_the_watchers_state(bus: Bus, results: Results) -> None:
    v = str(uuid.uuid4())
    state = DeviceEvent(
        kind="inventory",
        vm_id=VM,
        at=time.time(),
        source="rescan",
        devices=(
            dev("vda", 20 * GIB, None, 1.0),
            dev("vdb", GIB, serial_of(v), time.time() - 1),
        ),
    )
    await (await bus.bucket(DEVICES_BUCKET, DeviceEvent)).put(VM, state)
    actor, task = await start(bus)
    try:
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, 0.0))
        r = await wait_for(lambda: results.attach.get("op-1"), timeout=5)
        assert (r.device_path, r.proof, r.error, r.size) == ("/dev/vdb", "serial", None, GIB)
    finally:
        await stop(actor, task)


async def test_serial_device_in_the_watchers_snapshot(bus: Bus, results: Results) -> None:
    """The watcher saves its list as a snapshot (vm_id, watcher, at, devices, seq)."""
    v = str(uuid.uuid4())
    snapshot = {
        "vm_id": VM,
        "watcher": "w-1",
        "at": time.time(),
        "seq": 7,
        "devices": [msgspec.to_builtins(dev("vdb", GIB, serial_of(v), time.time()))],
    }
    await (await bus.bucket(DEVICES_BUCKET, dict)).put(VM, snapshot)
    actor, task = await start(bus)
    try:
        assert actor.device_state_known
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, 0.0))
        r = await wait_for(lambda: results.attach.get("op-1"), timeout=5)
        assert (r.device_path, r.proof) == ("/dev/vdb", "serial")
    finally:
        await stop(actor, task)


async def test_device_after_request_and_latency(bus: Bus, results: Results) -> None:
    actor, task = await start(bus)
    try:
        v, w = str(uuid.uuid4()), str(uuid.uuid4())
        t0 = time.time()
        await bus.publish(correlate_request_subject(VM), attach_request("op-s", v, GIB, t0))
        await bus.publish(correlate_request_subject(VM), attach_request("op-x", w, 2 * GIB, t0))
        await wait_for(lambda: actor.engine.waiting == 2, timeout=5)
        # One with its serial, one without: both are proven, neither takes the other's.
        await device_added(bus, dev("vdc", 2 * GIB, None, time.time()))
        seen = time.time()
        await device_added(bus, dev("vdb", GIB, serial_of(v), seen))
        s = await wait_for(lambda: results.attach.get("op-s"), timeout=5)
        x = await wait_for(lambda: results.attach.get("op-x"), timeout=5)
        assert (s.device_path, s.proof) == ("/dev/vdb", "serial")
        assert (x.device_path, x.proof) == ("/dev/vdc", "exclusive")
        latency = results.arrived["op-s"] - seen
        print(f"device event published -> result received: {latency * 1000:.1f} ms")
        assert latency < 0.05
        # Acknowledged only once published: nothing is left pending on the consumer.
        await wait_for(lambda: actor._consumer is not None and actor._consumer.handled == 2)
    finally:
        await stop(actor, task)


async def test_timeout_and_ambiguity(bus: Bus, results: Results) -> None:
    actor, task = await start(bus, correlation_timeout=0.5)
    try:
        t0 = time.time()
        v = str(uuid.uuid4())
        await bus.publish(correlate_request_subject(VM), attach_request("op-t", v, GIB, t0))
        r = await wait_for(lambda: results.attach.get("op-t"), timeout=5)
        assert r.error is not None and r.error.code == "device_timeout"
        assert serial_of(v) in r.error.message and "0.5 s" in r.error.message
        assert time.time() - t0 < 2
        # Two same-size attaches without serials: both fail explicitly, neither guesses.
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        t1 = time.time()
        await bus.publish(correlate_request_subject(VM), attach_request("op-a", a, GIB, t1))
        await bus.publish(correlate_request_subject(VM), attach_request("op-b", b, GIB, t1))
        await wait_for(lambda: actor.engine.waiting == 2, timeout=5)
        await device_added(bus, dev("vdd", GIB, None, time.time()))
        ra = await wait_for(lambda: results.attach.get("op-a"), timeout=5)
        rb = await wait_for(lambda: results.attach.get("op-b"), timeout=5)
        assert ra.error and rb.error
        assert ra.error.code == rb.error.code == "ambiguous_device"
    finally:
        await stop(actor, task)


async def test_attach_in_flight_from_the_attaching_bucket(bus: Bus, results: Results) -> None:
    """An attach the executor is running when the correlator starts competes for devices;
    one to another VM does not."""
    attaching = await bus.bucket(ATTACHING_BUCKET, AttachInFlight)
    other = str(uuid.uuid4())
    await attaching.create(
        "op-other",
        AttachInFlight(
            operation_id="op-other",
            volume_id=other,
            vm_id=VM,
            accepted_at="2020-01-01T00:00:00Z",
        ),
    )
    await attaching.create(
        "op-far",
        AttachInFlight(operation_id="op-far", volume_id=str(uuid.uuid4()), vm_id="another-vm"),
    )
    actor, task = await start(bus)
    try:
        assert "op-other" in actor.engine._claimants
        assert "op-far" not in actor.engine._claimants
        v = str(uuid.uuid4())
        t0 = time.time()
        await device_added(bus, dev("vdb", GIB, None, t0 + 0.01))
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, t0))
        await wait_for(lambda: actor.engine.waiting == 1, timeout=5)
        await asyncio.sleep(0.2)
        assert "op-1" not in results.attach  # vdb could be op-other's (size not known)
        # op-other's request says 5 GiB: vdb can only be op-1's.
        await bus.publish(
            correlate_request_subject(VM), attach_request("op-other", other, 5 * GIB, 1.0)
        )
        r = await wait_for(lambda: results.attach.get("op-1"), timeout=5)
        assert (r.device_path, r.proof) == ("/dev/vdb", "exclusive")
        # op-other's attach is given up: its "failed" event ends it (it then times out).
        failed = OperationEvent(
            operation_id="op-other",
            type="attach",
            status="failed",
            vm_id=VM,
            volume_id=other,
            at="2020-01-01T00:00:01Z",
        )
        await bus.publish(event_subject("op-other"), failed)
        await wait_for(lambda: "op-other" in actor.engine._ended, timeout=5)
    finally:
        await stop(actor, task)


async def test_attaches_on_another_hosts_clock(bus: Bus, results: Results) -> None:
    """An executor's times are compared with the watcher's only when they are on this
    host's clock: an attach in flight on another host's clock (an hour ahead here) competes
    for every device of its size, one on this host's clock keeps its window."""
    later = time.time() + 3600
    attaching = await bus.bucket(ATTACHING_BUCKET, AttachInFlight)
    there, here = str(uuid.uuid4()), str(uuid.uuid4())
    for op, volume, clock in (("op-there", there, THERE), ("op-here", here, HERE)):
        record = AttachInFlight(
            operation_id=op,
            volume_id=volume,
            vm_id=VM,
            accepted_at=iso(later),
            started_at=later,
            clock=clock,
        )
        await attaching.create(op, record)
    actor, task = await start(bus)
    try:
        assert {"op-there", "op-here"} <= set(actor.engine._claimants)
        t0 = time.time()
        await device_added(bus, dev("vdb", GIB, None, t0 + 0.01))
        v = str(uuid.uuid4())
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, t0))
        await wait_for(lambda: actor.engine.waiting == 1, timeout=5)
        await asyncio.sleep(0.2)
        assert "op-1" not in results.attach  # vdb could be op-there's, whatever its clock says
        # op-there's request says 5 GiB; op-here, on this clock, starts in an hour: vdb can
        # only be op-1's.
        await bus.publish(
            correlate_request_subject(VM),
            attach_request("op-there", there, 5 * GIB, later, clock=THERE),
        )
        r = await wait_for(lambda: results.attach.get("op-1"), timeout=5)
        assert (r.device_path, r.proof) == ("/dev/vdb", "exclusive")
        # The same for an attach announced by its executing event (no clock: an older
        # executor, counted as another host's).
        executing = OperationEvent(
            operation_id="op-x",
            type="attach",
            status="executing",
            vm_id=VM,
            volume_id=str(uuid.uuid4()),
            at=iso(later),
        )
        await bus.publish(event_subject("op-x"), executing)
        await wait_for(lambda: "op-x" in actor.engine._claimants, timeout=5)
        t1 = time.time()
        await device_added(bus, dev("vdc", 2 * GIB, None, t1 + 0.01))
        w = str(uuid.uuid4())
        await bus.publish(correlate_request_subject(VM), attach_request("op-2", w, 2 * GIB, t1))
        await wait_for(lambda: actor.engine.waiting == 2, timeout=5)  # op-there still waits
        await asyncio.sleep(0.2)
        assert "op-2" not in results.attach  # vdc could be op-x's
    finally:
        await stop(actor, task)


async def test_release(bus: Bus, results: Results) -> None:
    actor, task = await start(bus, detach_timeout=0.5)
    try:
        v, w = str(uuid.uuid4()), str(uuid.uuid4())
        t0 = time.time()
        vdb = dev("vdb", GIB, serial_of(v), t0 + 0.01)
        await device_added(bus, vdb)
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, t0))
        assert (await wait_for(lambda: results.attach.get("op-1"))).device_path == "/dev/vdb"
        # Detached in CloudStack: answered when the watcher sees the device go.
        await bus.publish(
            release_request_subject(VM), ReleaseRequest(operation_id="d-1", volume_id=v)
        )
        await wait_for(lambda: actor.engine.waiting == 1, timeout=5)
        assert "d-1" not in results.release
        gone = DeviceEvent(kind="removed", vm_id=VM, at=time.time(), source="uevent", device=vdb)
        await bus.publish(device_subject(VM), gone)
        r = await wait_for(lambda: results.release.get("d-1"), timeout=5)
        assert r.gone
        # A device that stays: gone=False after the detach timeout, with the reason.
        await device_added(bus, dev("vdb", GIB, serial_of(w), time.time()))
        await wait_for(lambda: len(actor.engine.devices()) == 1, timeout=5)
        await bus.publish(
            release_request_subject(VM),
            ReleaseRequest(operation_id="d-2", volume_id=w, device_path="/dev/vdb"),
        )
        r = await wait_for(lambda: results.release.get("d-2"), timeout=5)
        assert not r.gone and "vdb" in r.message
    finally:
        await stop(actor, task)


async def test_undecodable_request_is_rejected_and_health(bus: Bus, results: Results) -> None:
    actor, task = await start(bus)
    try:
        await bus.publish(correlate_request_subject(VM), b"{not json")
        await bus.publish(correlate_request_subject(VM), {"operation_id": "x"})

        async def dead() -> bool:
            return (await bus.js.stream_info(DEAD_LETTERS.name)).state.messages == 2

        await wait_for(dead, timeout=5)
        health = await bus.bucket(HEALTH_BUCKET, Heartbeat)
        beat = await wait_for(lambda: health.get("correlator.test"), timeout=5)
        assert beat[0].checks["attach_tracking"].status == "ok"
    finally:
        await stop(actor, task)


@pytest.mark.parametrize("saved", ["none", "before the host booted"])
async def test_inventory_event_when_there_is_no_state(
    bus: Bus, results: Results, saved: str
) -> None:
    """Without the watcher's saved state the actor works from its inventory event. A state
    saved before the host booted is none: the kernel has named its disks again since."""
    v = str(uuid.uuid4())
    if saved != "none":
        before_boot = boot_time() - 60
        snapshot = {
            "vm_id": VM,
            "watcher": "w-1",
            "at": before_boot,
            "devices": [msgspec.to_builtins(dev("vdb", GIB, serial_of(v), before_boot))],
        }
        await (await bus.bucket(DEVICES_BUCKET, dict)).put(VM, snapshot)
    actor, task = await start(bus)
    try:
        assert not actor.device_state_known and actor.engine.devices() == []
        await watcher_started(bus, dev("vdc", GIB, serial_of(v), time.time()))
        await wait_for(lambda: actor.device_state_known, timeout=5)
        await bus.publish(correlate_request_subject(VM), attach_request("op-1", v, GIB, 0.0))
        r = await wait_for(lambda: results.attach.get("op-1"), timeout=5)
        assert (r.device_path, r.proof) == ("/dev/vdc", "serial")
    finally:
        await stop(actor, task)


async def test_a_nats_reconnect_keeps_serial_less_proofs_a_watcher_restart_does_not(
    nats_server: NatsServer, bus: Bus, results: Results, tmp_path: Path
) -> None:
    """A reconnect is not a restart: the correlator reads the watcher's saved state again,
    finds the same appearances (same stamps) and its proof by exclusion stands. A restarted
    watcher lists the disk again after a gap: without serial, nothing proves it any more."""
    host = FakeHost(tmp_path / "host")
    host.add("vda", 2 * GIB, serial=None)
    actor, task = await start(bus)
    watcher = WatcherActor(bus, host.settings(poll_interval=0.05), VM, "w")
    watching = asyncio.create_task(watcher.run())
    mapped = [MappedVolume(volume_id=str(uuid.uuid4()), operation_id="op-1")]
    try:
        await wait_for(lambda: actor.device_state_known)
        started = time.time()
        host.add("vdb", GIB, serial=None)
        request = attach_request("op-1", mapped[0].volume_id, GIB, started)
        await bus.publish(correlate_request_subject(VM), request)
        r = await wait_for(lambda: results.attach.get("op-1"))
        assert (r.device_path, r.proof) == (f"{host.dev}/vdb", "exclusive")
        assert actor.engine.prove(mapped)[0].proof == "exclusive"
        snapshots = await bus.bucket(DEVICES_BUCKET, DeviceSnapshot)

        async def saved() -> bool:
            got = await snapshots.get(VM)
            return got is not None and "vdb" in {d.name for d in got[0].devices}

        await wait_for(saved)

        loads = actor.device_state_loads
        nats_server.stop()
        nats_server.start()
        await wait_for(lambda: actor.device_state_loads > loads, timeout=15)
        await wait_for(lambda: actor.engine.attaches_known, timeout=10)
        proof = actor.engine.prove(mapped)[0]
        assert (proof.proof, proof.device_path) == ("exclusive", f"{host.dev}/vdb"), proof

        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        watcher = WatcherActor(bus, host.settings(poll_interval=0.05), VM, "w")
        watching = asyncio.create_task(watcher.run())
        await wait_for(lambda: actor.engine.prove(mapped)[0].proof == "none", timeout=10)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await stop(actor, task)
