"""The correlation engine against generated worlds whose ground truth the test knows.

A seeded simulator plays a host: up to 15 concurrent attaches to the local VM (same and
different sizes, serials on, off or mixed), devices that appear before or after the
executor's request, stale devices present before, CloudStack failures, roll-backs whose
terminal event comes before the device is seen to go, detaches and re-attaches that reuse
a letter, watcher restarts and NATS reconnects; in some worlds executors on other hosts,
whose clocks are off by up to an hour either way (or name no clock). After every decision
the invariant is checked: no request is ever mapped to a device that is not its volume's.

Worlds with ``times`` stamp devices as the watcher does now: a disk a uevent announced with
when it came (both bounds), one a rescan found with an interval that holds when it came, one
present (or unreadable) at a watcher's start scan "before it started"; their reconnects read
the watcher's saved state again, as the actor does, and must leave every proof standing.
"""

from __future__ import annotations

import heapq
import itertools
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.correlator.engine import SKEW, CorrelationEngine, Decision, InFlightAttach
from schemas.common import GIB, serial_of
from schemas.devices import DeviceEvent, DeviceInfo, MappedVolume
from schemas.events import OperationEvent
from schemas.internal import CorrelateRequest, CorrelateResult, ReleaseRequest, ReleaseResult

VM = "vm-1"
TIMEOUT = 30.0
HERE = "boot-id-of-the-vm-host"  # the correlator's (and its watcher's) clock


def iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def device(
    name: str, size: int, serial: str | None = None, at: float = 0.0, after: float | None = None
) -> DeviceInfo:
    return DeviceInfo(
        name=name,
        path=f"/dev/{name}",
        size=size,
        serial=serial,
        appeared_at=at,
        appeared_after=after,
    )


def added(info: DeviceInfo, at: float | None = None) -> DeviceEvent:
    t = info.appeared_at if at is None else at
    return DeviceEvent(kind="added", vm_id=VM, at=t, source="uevent", device=info)


def removed(info: DeviceInfo, at: float) -> DeviceEvent:
    return DeviceEvent(kind="removed", vm_id=VM, at=at, source="uevent", device=info)


def inventory(devs: list[DeviceInfo], at: float, source: str = "rescan") -> DeviceEvent:
    return DeviceEvent(kind="inventory", vm_id=VM, at=at, source=source, devices=tuple(devs))  # type: ignore[arg-type]


def op_event(
    op: str,
    status: str,
    at: float,
    volume_id: str,
    size: int | None = None,
    clock: str | None = None,
) -> Any:
    return OperationEvent(
        operation_id=op,
        type="attach",
        status=status,  # type: ignore[arg-type]
        volume_id=volume_id,
        vm_id=VM,
        at=iso(at),
        size=size,
        clock=clock,
    )


def request(
    op: str, volume_id: str, size: int, started_at: float, clock: str | None = None
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


def new_volume() -> str:
    return str(uuid.uuid4())


# -- the simulated host ---------------------------------------------------------------------


@dataclass
class Attach:
    op: str
    volume_id: str
    size: int
    serial_on: bool
    announce_at: float
    started_at: float
    job: float  # CloudStack job duration: the request arrives after it
    device_delay: float | None  # None: the device never shows up
    cs_fails: bool = False
    clock: str | None = None  # the executor's: its times are the truth plus ``offset``
    offset: float = 0.0
    rolled_back: bool = False
    result: CorrelateResult | None = None
    requested: bool = False
    ended: bool = False


@dataclass
class Stats:
    serial: int = 0
    exclusive: int = 0
    ambiguous: int = 0
    timeout: int = 0
    releases: int = 0
    reproven: int = 0
    unproven: int = 0
    kept: int = 0  # proofs by exclusion that stood through a reconnect
    uncertain: int = 0  # disks stamped with an interval (a rescan found them)
    resized: int = 0
    doubted: int = 0  # releases that waited for a disk that may be another one now
    foreign_exclusive: int = 0  # proven by exclusion for an executor on another clock


@dataclass(eq=False)
class Appearance:
    """One physical device appearance; ``info`` is what the watcher reported of it."""

    name: str
    size: int
    serial: str | None
    owner: str | None  # the volume it is, None for other disks
    info: DeviceInfo | None = None


@dataclass
class World:
    rng: random.Random
    mode: str  # "on" | "off" | "mixed"
    clocks: bool = False  # executors on other hosts, with their own clocks
    times: bool = False  # the watcher's kernel times (see the module's docstring)
    engine: CorrelationEngine = field(init=False)
    now: float = 0.0
    present: dict[str, Appearance] = field(default_factory=dict)  # the kernel's truth
    observed: dict[str, Appearance] = field(default_factory=dict)  # what the watcher reported
    last_observation: float = 0.0
    heap: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: Any = field(default_factory=itertools.count)
    attaches: dict[str, Attach] = field(default_factory=dict)
    watcher_down: bool = False
    timeout: float = TIMEOUT
    outages: list[tuple[float, float]] = field(default_factory=list)
    stuck_volumes: set[str] = field(default_factory=set)
    reattach: dict[str, Attach] = field(default_factory=dict)
    rolling_back: dict[str, Attach] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    log: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)  # volume → attach: the mapping rows

    def __post_init__(self) -> None:
        # Short time-outs make devices that come after their attach has failed.
        self.timeout = self.rng.choice([2.0, 8.0, TIMEOUT])
        self.engine = CorrelationEngine(
            VM,
            now=0.0,
            timeout=self.timeout,
            release_timeout=TIMEOUT,
            linger=5.0,
            clock=HERE if self.clocks else None,
        )

    # scheduling
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), fn))

    def run(self) -> None:
        while True:
            nxt = self.heap[0][0] if self.heap else None
            deadline = self.engine.next_deadline()
            if deadline is not None and (nxt is None or deadline <= nxt):
                if nxt is None and deadline > 5000:
                    break
                self.now = max(self.now, deadline)
                self.feed(self.engine.tick(self.now))
                continue
            if nxt is None:
                break
            t, _, fn = heapq.heappop(self.heap)
            self.now = max(self.now, t)
            fn()

    # devices: the kernel changes at once, the watcher reports in order, a little later
    def free_name(self) -> str:
        for i in itertools.count():
            name = "vd" + ("abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else f"z{i}")
            if name not in self.present:
                return name
        raise AssertionError

    def observe(self, fn: Callable[[], None]) -> None:
        self.last_observation = max(self.last_observation, self.now) + self.rng.uniform(0, 0.3)
        self.at(self.last_observation, fn)

    def plug(self, size: int, serial: str | None, owner: str | None) -> Appearance:
        app = Appearance(self.free_name(), size, serial, owner)
        self.present[app.name] = app
        self.log.append(f"{self.now:.3f} plug {app.name} {size // GIB}G {serial} -> {owner}")

        came = self.now
        # A rescan finds it (netlink missed it): after a scan that began before it came.
        scanned = self.times and self.rng.random() < 0.3
        missed_by = self.rng.uniform(0, 2.0) if scanned else 0.0

        def seen() -> None:
            if self.watcher_down or self.present.get(app.name) is not app:
                return  # came and went unseen, or the watcher is down (its inventory tells)
            if not self.times:
                app.info = device(app.name, size, serial, self.now)
            elif scanned:
                app.info = device(app.name, size, serial, self.now, came - missed_by)
                self.stats.uncertain += 1
            else:  # its uevent: when the kernel announced it
                app.info = device(app.name, size, serial, came, came)
            self.observed[app.name] = app
            self.feed(self.engine.device_event(added(app.info, self.now), self.now))
            self.check_proofs()

        self.observe(seen)
        return app

    def start_scan(self, apps: list[Appearance], at: float) -> DeviceEvent:
        """A watcher's start scan: with ``times``, some disks cannot be read then (listed as
        unread) and are announced later, still as present before the start."""
        listed, unread = [], []
        for app in apps:
            if not self.times:
                app.info = device(app.name, app.size, app.serial, at)
                listed.append(app.info)
                continue
            app.info = device(app.name, app.size, app.serial, at, 0.0)
            if self.rng.random() < 0.8:
                listed.append(app.info)
                continue
            unread.append(app.name)

            def readable(app: Appearance = app) -> None:
                if self.watcher_down or self.present.get(app.name) is not app:
                    return
                assert app.info is not None
                event = DeviceEvent(
                    kind="added", vm_id=VM, at=self.now, source="start", device=app.info
                )
                self.feed(self.engine.device_event(event, self.now))
                self.check_proofs()

            self.observe(readable)
        return DeviceEvent(
            kind="inventory",
            vm_id=VM,
            at=at,
            source="start",
            devices=tuple(listed),
            unread=tuple(unread),
        )

    def unplug(self, app: Appearance) -> None:
        if self.present.get(app.name) is not app:
            return
        del self.present[app.name]
        self.log.append(f"{self.now:.3f} unplug {app.name}")

        def seen() -> None:
            if self.watcher_down or self.observed.get(app.name) is not app:
                return
            del self.observed[app.name]
            assert app.info is not None
            self.feed(self.engine.device_event(removed(app.info, self.now), self.now))
            self.check_proofs()

        self.observe(seen)

    def resize(self) -> None:
        """A present disk changes size (the watcher reports ``changed``): still its owner's."""
        if not self.present:
            return
        app = self.rng.choice(sorted(self.present.values(), key=lambda a: a.name))
        app.size = self.rng.choice([GIB, 2 * GIB, 3 * GIB, 4 * GIB])
        self.log.append(f"{self.now:.3f} resize {app.name} {app.size // GIB}G")

        def seen() -> None:
            if self.watcher_down or self.observed.get(app.name) is not app or app.info is None:
                return
            app.info = msgspec.structs.replace(app.info, size=app.size)
            self.stats.resized += 1
            self.feed(self.engine.device_event(changed(app.info, self.now), self.now))
            self.check_proofs()

        self.observe(seen)

    def watcher_restart(self, gap: float) -> None:
        self.watcher_down = True
        self.outages.append((self.now, self.now + gap))
        self.log.append(f"{self.now:.3f} watcher down for {gap:.3f}")

        def back() -> None:
            self.watcher_down = False
            self.last_observation = max(self.last_observation, self.now)
            self.observed = dict(self.present)
            # It stamps everything "now" (with ``times``: "before it started").
            scan = self.start_scan(list(self.present.values()), self.now)
            self.log.append(f"{self.now:.3f} watcher restart inventory")
            self.feed(self.engine.device_event(scan, self.now))
            self.check_proofs()

        self.at(self.now + gap, back)

    def reconnect(self, gap: float) -> None:
        self.engine.lose_track("test reconnect", self.now)
        self.log.append(f"{self.now:.3f} reconnect, sync after {gap:.3f}")

        def sync() -> None:
            if self.times:
                self.reread_saved_state()
            flying = [
                InFlightAttach(a.op, a.volume_id, a.announce_at + a.offset, clock=a.clock)
                for a in self.attaches.values()
                if a.announce_at <= self.now and not a.ended
            ]
            self.feed(self.engine.sync_attaches(flying, self.now))

        self.at(self.now + gap, sync)

    def reread_saved_state(self) -> None:
        """The actor reads the watcher's saved state again after a reconnect: the same
        appearances, stamped as before. Nothing proven may be lost."""
        rows = [MappedVolume(volume_id=v, operation_id=op) for v, op in self.mapped.items()]
        before = {p.volume_id: p for p in self.engine.prove(rows) if p.proof == "exclusive"}
        saved = [app.info for app in self.observed.values() if app.info]
        self.log.append(f"{self.now:.3f} saved state read again")
        self.feed(self.engine.device_event(inventory(saved, self.now, "start"), self.now))
        for p in self.engine.prove(rows):
            if p.volume_id in before:
                assert p == before[p.volume_id], f"a reconnect un-proved {p}\n" + self.trace()
                self.stats.kept += 1
        self.check_proofs()

    def mine(self, volume_id: str) -> list[Appearance]:
        return [app for app in self.present.values() if app.owner == volume_id]

    # the executor's side of one attach
    def start_attach(self, a: Attach) -> None:
        self.attaches[a.op] = a
        self.log.append(
            f"{self.now:.3f} attach {a.op} {a.volume_id[:8]} {a.size // GIB}G "
            f"start={a.started_at:.3f} request={a.started_at + a.job:.3f} "
            f"device={a.device_delay and a.started_at + a.device_delay} cs_fails={a.cs_fails}"
        )
        executing = op_event(
            a.op, "executing", a.announce_at + a.offset, a.volume_id, clock=a.clock
        )
        self.at(a.announce_at, lambda: self.feed(self.engine.operation_event(executing, self.now)))
        if a.cs_fails:
            self.at(a.started_at + a.job, lambda: self.end(a, "failed"))
            return
        if a.device_delay is not None:

            def appear() -> None:
                if not a.rolled_back:
                    serial = serial_of(a.volume_id) if a.serial_on else None
                    self.plug(a.size, serial, a.volume_id)

            self.at(a.started_at + a.device_delay, appear)

        def send() -> None:
            a.requested = True
            req = request(a.op, a.volume_id, a.size, a.started_at + a.offset, a.clock)
            self.feed(self.engine.attach(req, self.now))
            if self.rng.random() < 0.1:  # a redelivery must get the same answer
                again = self.now + self.rng.uniform(0, 40)
                self.at(again, lambda: self.feed(self.engine.attach(req, self.now)))

        self.at(a.started_at + a.job, send)

    def end(self, a: Attach, status: str) -> None:
        a.ended = True
        self.log.append(f"{self.now:.3f} {a.op} {status}")
        event = op_event(a.op, status, self.now + a.offset, a.volume_id, clock=a.clock)
        self.feed(self.engine.operation_event(event, self.now))

    # decisions
    def feed(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, CorrelateResult):
                self.on_attach_result(d)
            else:
                self.on_release_result(d)

    def on_attach_result(self, r: CorrelateResult) -> None:
        a = self.attaches[r.operation_id]
        assert a.requested, f"answered before its request: {r}"
        if a.result is not None:
            assert r == a.result, f"redelivery answered differently: {a.result} then {r}"
            return
        a.result = r
        self.log.append(f"{self.now:.3f} {r.operation_id} -> {r.device_path} {r.error}")
        rng = self.rng
        if r.error is None:
            # THE invariant: the appearance the engine named is this volume's.
            assert r.device_path is not None
            name = r.device_path.removeprefix("/dev/")
            app = self.observed.get(name)
            assert app is not None, f"{r.operation_id} mapped to unseen {name}\n" + self.trace()
            assert app.owner == a.volume_id, (
                f"WRONG MAPPING: {r.operation_id} (volume {a.volume_id}) got {name} owned by "
                f"{app.owner} via {r.proof}\n" + self.trace()
            )
            self.mapped[a.volume_id] = a.op
            self.check_proofs()
            if r.proof == "serial":
                self.stats.serial += 1
            else:
                assert r.proof == "exclusive"
                self.stats.exclusive += 1
                self.stats.foreign_exclusive += a.clock != self.engine.clock
            self.at(self.now + rng.uniform(0.01, 0.2), lambda: self.end(a, "completed"))
            if rng.random() < 0.5:
                self.detach_later(a, app)
            return
        assert r.error.code in ("ambiguous_device", "device_timeout"), r
        assert r.error.message
        if r.error.code == "ambiguous_device":
            self.stats.ambiguous += 1
        else:
            self.stats.timeout += 1
        # Roll-back as the executor does it: detach (the device goes), ask the correlator
        # to release the volume, and publish "failed" once that is answered.
        done = self.now + rng.uniform(0.2, 2.0)

        def rollback() -> None:
            a.rolled_back = True
            for app in self.mine(a.volume_id):
                self.unplug(app)
            self.rolling_back[a.op] = a
            rel = ReleaseRequest(operation_id=a.op, volume_id=a.volume_id)
            self.feed(self.engine.release(rel, self.now))

        self.at(done, rollback)

    def detach_later(self, a: Attach, app: Appearance) -> None:
        rng = self.rng
        t = self.now + rng.uniform(0.5, 5)
        stuck = rng.random() < 0.05
        if stuck:
            self.stuck_volumes.add(a.volume_id)
        else:
            self.at(t + rng.uniform(0, 1), lambda: self.unplug(app))
        rel = ReleaseRequest(
            operation_id=a.op + "-detach",
            volume_id=a.volume_id,
            device_path=f"/dev/{app.name}" if rng.random() < 0.7 else None,
        )
        self.at(t + rng.uniform(0, 1), lambda: self.feed(self.engine.release(rel, self.now)))
        if not stuck and rng.random() < 0.5:
            # Re-attach the same volume once the detach is over (the executor orders the
            # operations of a volume): the lowest free letter is often the same one.
            self.reattach[rel.operation_id] = a

    def check_proofs(self) -> None:
        """A mapping proven again names its volume's device (as the watcher saw it) or
        nothing, whatever came and went since the attach."""
        rows = [MappedVolume(volume_id=v, operation_id=op) for v, op in self.mapped.items()]
        for p in self.engine.prove(rows):
            if p.proof == "none":
                assert p.device_path is None and p.reason
                self.stats.unproven += 1
                continue
            assert p.device_path is not None
            app = self.observed.get(p.device_path.removeprefix("/dev/"))
            assert app is not None and app.owner == p.volume_id, (
                f"WRONG PROOF: volume {p.volume_id} proven on {p.device_path} owned by "
                f"{app and app.owner} via {p.proof}\n" + self.trace()
            )
            self.stats.reproven += 1

    def on_release_result(self, r: ReleaseResult) -> None:
        self.stats.releases += 1
        self.log.append(f"{self.now:.3f} release {r.operation_id} gone={r.gone}")
        left = self.mine(r.volume_id)
        rolled = self.rolling_back.pop(r.operation_id, None)
        if r.gone:
            assert not left, f"release said gone but {left} present\n" + self.trace()
        elif rolled is None and "which may be volume" in r.message:
            # Without serial, a disk listed again after a watcher outage may be another one
            # under the name: the engine waits for it and says so rather than say "gone".
            assert self.outages, r
            self.stats.doubted += 1
        elif rolled is None:
            assert left and r.volume_id in self.stuck_volumes, r
            assert r.message
        else:
            # A failed attach without serial: devices that may have been its one are still
            # there (another attach's, not rolled back yet). Honest, not a guess.
            assert "which may be volume" in r.message, r
        if rolled is not None:
            self.at(self.now + self.rng.uniform(0, 0.05), lambda: self.end(rolled, "failed"))
            return
        a = self.reattach.pop(r.operation_id, None)
        if a is not None:
            start = self.now + self.rng.uniform(0.1, 4)
            self.start_attach(self.make_attach(a.volume_id, a.size, a.serial_on, start))

    def make_attach(self, volume_id: str, size: int, serial_on: bool, start: float) -> Attach:
        rng = self.rng
        op = f"op{len(self.attaches)}-{rng.randrange(10**6)}"
        job = rng.uniform(0.2, 5.0)
        never = rng.random() < 0.05
        delay = rng.uniform(0.1, job + 1.5)
        if rng.random() < 0.1:  # slow to show up in the guest
            delay = job + rng.uniform(0, 2 * self.timeout)
        clock, offset = self.engine.clock, 0.0
        if self.clocks and rng.random() < 0.5:  # (no draw otherwise: same worlds as before)
            clock = rng.choice(["boot-id-of-another-host", None])
            offset = rng.choice(
                [rng.uniform(-1, 1), rng.uniform(-60, 60), rng.uniform(-3600, 3600), -10, 10]
            )
        return Attach(
            op=op,
            volume_id=volume_id,
            size=size,
            serial_on=serial_on,
            announce_at=start - rng.uniform(0.001, 0.05),  # "executing" precedes the send
            started_at=start,
            job=job,
            device_delay=None if never else delay,
            cs_fails=rng.random() < 0.05,
            clock=clock,
            offset=offset,
        )

    def trace(self) -> str:
        return "\n".join(self.log[-60:])


def simulate(seed: int, mode: str, clocks: bool = False, times: bool = False) -> World:
    rng = random.Random(seed)
    w = World(rng=rng, mode=mode, clocks=clocks, times=times)
    pool = rng.choice([[1], [1, 2], [1, 2, 3, 4]])
    sizes = [s * GIB for s in pool]

    def serial_for(p: float) -> str | None:
        on = mode == "on" or (mode == "mixed" and rng.random() < p)
        return serial_of(new_volume()) if on else None

    # What the watcher reported before the correlator started (the KV state).
    for _ in range(1 + rng.randrange(4)):
        size = rng.choice([*sizes, 20 * GIB])
        app = Appearance(w.free_name(), size, serial_for(0.4), None)
        app.info = device(app.name, size, app.serial, -rng.uniform(1, 500))
        w.present[app.name] = w.observed[app.name] = app
    if times:  # the watcher starts with the correlator: its start scan
        w.feed(w.engine.device_event(w.start_scan(list(w.present.values()), -0.5), 0.0))
    else:
        initial = [app.info for app in w.present.values() if app.info]
        w.feed(w.engine.device_event(inventory(initial, -0.5), 0.0))
    w.at(0.3, lambda: w.feed(w.engine.sync_attaches([], w.now)))
    for _ in range(rng.randrange(3)):  # other disks added after start, before any attach
        s = rng.choice(sizes)
        w.at(rng.uniform(0.1, 0.5), lambda s=s: w.plug(s, serial_for(0.3), None))
    n = rng.randint(1, 15)
    spread = rng.choice([0.5, 3.0, 20.0, 90.0])
    for _ in range(n):
        serial_on = mode == "on" or (mode == "mixed" and rng.random() < 0.5)
        start = 1.0 + rng.uniform(0, spread)
        w.start_attach(w.make_attach(new_volume(), rng.choice(sizes), serial_on, start))
    for _ in range(rng.randrange(3)):  # other disks go away at random

        def drop() -> None:
            others = [app for app in w.present.values() if app.owner is None]
            if others:
                w.unplug(rng.choice(others))

        w.at(rng.uniform(0.5, spread + 10), drop)
    if rng.random() < 0.3:
        for _ in range(1 + rng.randrange(3)):
            w.at(rng.uniform(1, spread + 10), w.resize)
    if rng.random() < 0.15:
        w.at(rng.uniform(1, spread + 5), lambda: w.watcher_restart(rng.uniform(0.1, 3)))
    if rng.random() < 0.15:
        w.at(rng.uniform(1, spread + 5), lambda: w.reconnect(rng.uniform(0.1, 3)))
    if times:  # (no draw otherwise: the same worlds as before)
        w.at(rng.uniform(1, spread + 10), lambda: w.reconnect(rng.uniform(0.1, 3)))
    w.run()
    check_outcome(w)
    return w


def check_outcome(w: World) -> None:
    for a in w.attaches.values():
        if not a.requested:
            assert a.result is None
            continue
        assert a.result is not None, f"{a.op} never answered\n" + w.trace()
        in_time = a.device_delay is not None and a.device_delay < a.job + w.timeout - 1
        end = a.started_at + a.job + w.timeout
        in_time &= not any(down < end and up > a.started_at for down, up in w.outages)
        if w.mode == "on" and in_time and a.volume_id not in w.stuck_volumes:
            assert a.result.error is None, f"with serials every attach completes: {a.result}"
            assert a.result.proof == "serial"
    assert w.engine.waiting == 0


MODE_SALT = {"on": 1, "off": 2, "mixed": 3}


@pytest.mark.parametrize("mode", ["on", "off", "mixed"])
def test_generated_worlds_never_map_a_device_to_the_wrong_volume(mode: str) -> None:
    total = Stats()
    for seed in range(1500):
        s = simulate(seed * 7919 + MODE_SALT[mode], mode).stats
        for k in vars(total):
            setattr(total, k, getattr(total, k) + getattr(s, k))
    # Not vacuous: the method really maps devices, and really refuses some.
    if mode == "on":
        assert total.serial > 6000 and total.exclusive == 0
    else:
        # Mixed hosts stop using exclusion once a volume's device had its serial.
        assert total.exclusive > (2000 if mode == "off" else 300), total
        assert total.ambiguous > 100, total
    assert total.releases > 1000
    assert total.reproven > 1000 and total.unproven > 100 and total.resized > 300, total


@pytest.mark.parametrize("mode", ["off", "mixed"])
def test_generated_worlds_with_executors_on_other_hosts(mode: str) -> None:
    """Half the attaches come from executors whose clocks are off (or unnamed): never a
    wrong mapping, and those attaches still get their devices by exclusion."""
    total = Stats()
    for seed in range(1500):
        s = simulate(seed * 7919 + MODE_SALT[mode], mode, clocks=True).stats
        for k in vars(total):
            setattr(total, k, getattr(total, k) + getattr(s, k))
    assert total.exclusive > (1500 if mode == "off" else 300), total
    assert total.foreign_exclusive > (600 if mode == "off" else 150), total
    assert total.ambiguous > 100, total


@pytest.mark.parametrize("mode", ["off", "mixed"])
def test_generated_worlds_with_the_watchers_kernel_times(mode: str) -> None:
    """Disks stamped with intervals, present "before the watcher started" (some unreadable
    then), saved states read again after reconnects: never a wrong mapping, no reconnect
    un-proves anything, and the intervals still let attaches be proven by exclusion."""
    total = Stats()
    for seed in range(400):
        s = simulate(seed * 7919 + MODE_SALT[mode] + 17, mode, seed % 2 == 1, times=True).stats
        for k in vars(total):
            setattr(total, k, getattr(total, k) + getattr(s, k))
    # Not vacuous, and intervals cost little: the same worlds without them prove ~4% more.
    assert total.exclusive > (400 if mode == "off" else 80), total
    assert total.kept > (80 if mode == "off" else 25), total
    assert total.uncertain > 500 and total.ambiguous > 100, total


@pytest.mark.parametrize(
    ("seed", "mode", "clocks", "times"),
    [
        # A disk grows just before the watcher goes down, so its resize is seen only in
        # the start scan; its volume's release is pending: not gone while the disk is there.
        (1003592, "on", True, False),
        # Without serial: the disk went while the watcher was down and another one, of
        # another size, took its name; its release waits for that one, and says "may be".
        (3972836884, "mixed", False, False),
        # The same at the same size: the release waited for the other volume's disk and
        # called it this volume's; prove would have named it for this volume too.
        (2933934851, "off", True, False),
        # A disk with serial went while the watcher was down, another volume's took its
        # name, and the start scan could not read it: its old serial proved nothing.
        (102151, "on", True, True),
    ],
)
def test_fixed_seed_worlds(seed: int, mode: str, clocks: bool, times: bool) -> None:
    """Worlds that once found a bug, kept as they are."""
    simulate(seed, mode, clocks, times)


# Derandomized: the same 150 worlds on every run, so that the test command's outcome does
# not depend on the draw (the generator can, about once in 90,000 worlds, plug a disk by hand
# late enough to break the engine's stated requirement that every attach goes through
# volumed). Wider sweeps: run simulate() over many seeds by hand.
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["on", "off", "mixed"]),
    clocks=st.booleans(),
    times=st.booleans(),
)
def test_hypothesis_worlds(seed: int, mode: str, clocks: bool, times: bool) -> None:
    simulate(seed, mode, clocks, times)


# -- targeted cases -------------------------------------------------------------------------


def engine(now: float = 0.0, clock: str | None = None) -> CorrelationEngine:
    e = CorrelationEngine(VM, now=now, timeout=30, release_timeout=30, clock=clock)
    e.sync_attaches([], now)
    return e


def only(decisions: list[Decision]) -> Any:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_serial_match_before_and_after_the_request() -> None:
    e = engine()
    v1, v2 = new_volume(), new_volume()
    # The device comes before the executor's message: it is kept and found.
    d1 = device("vdb", GIB, serial_of(v1), 10.5)
    assert e.device_event(added(d1), 10.5) == []
    r = only(e.attach(request("a1", v1, GIB, 10.0), 11.0))
    assert (r.device_path, r.proof, r.error) == ("/dev/vdb", "serial", None)
    # The request comes first; a same-size device of another volume does not fool it.
    assert e.attach(request("a2", v2, GIB, 20.0), 20.5) == []
    assert e.device_event(added(device("vdc", GIB, serial_of(new_volume()), 20.6)), 20.6) == []
    r = only(e.device_event(added(device("vdd", GIB, serial_of(v2), 20.7)), 20.7))
    assert (r.operation_id, r.device_path, r.proof) == ("a2", "/dev/vdd", "serial")


def test_serial_even_when_the_device_is_old() -> None:
    e = engine(100.0)
    v = new_volume()
    e.device_event(inventory([device("vdb", GIB, serial_of(v), 5.0)], 100.0), 100.0)
    r = only(e.attach(request("a", v, 2 * GIB, 50.0), 101.0))
    assert r.device_path == "/dev/vdb" and r.proof == "serial"


def test_two_concurrent_same_size_without_serial_are_both_ambiguous() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.operation_event(op_event("b", "executing", 10.1, vb), 10.1)
    e.device_event(added(device("vdb", GIB, None, 10.8)), 10.8)
    # A's request arrives while B is in flight with unknown size: wait, do not guess.
    assert e.attach(request("a", va, GIB, 10.0), 11.0) == []
    # A second device: A has two candidates, an explicit failure naming both.
    a = only(e.device_event(added(device("vdc", GIB, None, 11.2)), 11.2))
    assert a.operation_id == "a" and a.error.code == "ambiguous_device"
    assert "vdb, vdc" in a.error.message
    # B's devices could be A's too (A is being rolled back): B fails as well.
    b = only(e.attach(request("b", vb, GIB, 10.1), 11.5))
    assert b.operation_id == "b" and b.error.code == "ambiguous_device"
    assert "vdb, vdc" in b.error.message


def test_two_concurrent_same_size_both_requests_first() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    assert e.attach(request("a", va, GIB, 10.0), 11.0) == []
    assert e.attach(request("b", vb, GIB, 10.1), 11.1) == []
    out = e.device_event(added(device("vdb", GIB, None, 11.2)), 11.2)
    assert sorted(r.operation_id for r in out) == ["a", "b"]
    assert all(r.error.code == "ambiguous_device" and "vdb" in r.error.message for r in out)


def test_two_concurrent_different_sizes_without_serial_are_both_proven() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.operation_event(op_event("b", "executing", 10.1, vb), 10.1)
    e.device_event(added(device("vdb", 2 * GIB, None, 10.8)), 10.8)
    assert e.attach(request("a", va, 2 * GIB, 10.0), 11.0) == []  # B's size not known yet
    r = only(e.attach(request("b", vb, GIB, 10.1), 11.5))
    assert (r.operation_id, r.device_path, r.proof) == ("a", "/dev/vdb", "exclusive")
    r = only(e.device_event(added(device("vdc", GIB, None, 11.6)), 11.6))
    assert (r.operation_id, r.device_path, r.proof) == ("b", "/dev/vdc", "exclusive")


def test_early_request_cannot_take_a_concurrent_attachs_device() -> None:
    """The trap the brief's rule alone would fall into: B's device appears first, A's
    request arrives before B's (CloudStack finished A first)."""
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.operation_event(op_event("b", "executing", 10.1, vb), 10.1)
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)  # really B's
    assert e.attach(request("a", va, GIB, 10.0), 10.9) == []
    out = e.attach(request("b", vb, GIB, 10.1), 11.0)
    assert all(r.error and r.error.code == "ambiguous_device" for r in out) and len(out) == 2


def test_stale_device_is_never_taken() -> None:
    e = engine()
    v = new_volume()
    e.device_event(inventory([device("vdb", GIB, None, 3.0)], 4.0), 4.0)
    e.device_event(added(device("vdc", GIB, None, 9.0)), 9.0)  # before the attach: stale
    assert e.attach(request("a", v, GIB, 10.0), 11.0) == []
    r = only(e.tick(41.0))
    assert r.error.code == "device_timeout"
    assert serial_of(v) in r.error.message and "1 GiB" in r.error.message
    assert "30 s" in r.error.message


def test_skew_is_small() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.0 - SKEW / 2)), 10.0)
    r = only(e.attach(request("a", v, GIB, 10.0), 11.0))
    assert r.device_path == "/dev/vdb"
    e2 = engine()
    e2.device_event(added(device("vdb", GIB, None, 10.0 - 2 * SKEW)), 10.0)
    assert e2.attach(request("a", v, GIB, 10.0), 11.0) == []
    assert SKEW <= 0.1


def test_size_must_match_exactly() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB + 512, None, 10.5)), 10.5)
    assert e.attach(request("a", v, GIB, 10.0), 11.0) == []
    assert only(e.tick(41.0)).error.code == "device_timeout"


def test_timeout_with_serial() -> None:
    e = engine()
    v = new_volume()
    assert e.attach(request("a", v, GIB, 10.0), 11.0) == []
    assert e.next_deadline() == 41.0
    assert e.tick(40.9) == []
    r = only(e.tick(41.0))
    assert r.error.code == "device_timeout" and serial_of(v) in r.error.message
    assert e.waiting == 0
    # A redelivered request gets the same answer, not a new wait.
    assert only(e.attach(request("a", v, GIB, 10.0), 50.0)) == r


def test_late_device_of_a_failed_attach_is_not_given_to_another() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.attach(request("a", va, GIB, 10.0), 11.0)
    assert only(e.tick(41.0)).error.code == "device_timeout"
    e.operation_event(op_event("b", "executing", 41.5, vb), 41.5)
    assert e.attach(request("b", vb, GIB, 41.5), 42.0) == []
    # A's device shows up late, while A is being rolled back.
    r = only(e.device_event(added(device("vdb", GIB, None, 42.1)), 42.1))
    assert r.operation_id == "b" and r.error.code == "ambiguous_device"
    assert "vdb" in r.error.message and "attach a " in r.error.message


def test_device_reported_just_after_the_failed_event_is_still_suspect() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.attach(request("a", va, GIB, 10.0), 11.0)
    assert only(e.tick(41.0)).error.code == "device_timeout"
    e.operation_event(op_event("b", "executing", 41.5, vb), 41.5)
    assert e.attach(request("b", vb, GIB, 41.5), 42.0) == []
    # Roll-back done, "failed" published; the watcher reports A's device a moment later.
    assert e.operation_event(op_event("a", "failed", 42.2, va), 42.2) == []
    assert e.tick(42.3) == []
    r = only(e.device_event(added(device("vdb", GIB, None, 42.4)), 42.4))
    assert r.operation_id == "b" and r.error.code == "ambiguous_device"
    # B is rolled back as well; once the linger is over, new devices are judged on their own.
    e.operation_event(op_event("b", "failed", 43.0, vb), 43.0)
    e.tick(48.0)
    assert e.next_deadline() is None
    vc = new_volume()
    e.operation_event(op_event("c", "executing", 50.0, vc), 50.0)
    e.device_event(added(device("vdc", GIB, None, 50.5)), 50.5)
    assert only(e.attach(request("c", vc, GIB, 50.0), 51.0)).device_path == "/dev/vdc"


def test_cloudstack_failure_announced_then_ended_taints_its_window() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    e.operation_event(op_event("b", "executing", 10.1, vb), 10.1)
    e.device_event(added(device("vdb", GIB, None, 10.8)), 10.8)
    e.attach(request("b", vb, GIB, 10.1), 11.0)  # waits: a's size unknown
    out = e.operation_event(op_event("a", "failed", 11.5, va), 11.5)
    # a may have half-attached: vdb cannot be proven b's.
    r = only(out)
    assert r.operation_id == "b" and r.error.code == "ambiguous_device"


def test_sequential_attaches_without_serial_all_succeed() -> None:
    e = engine()
    for i in range(8):
        v = new_volume()
        t = 10.0 * (i + 1)
        e.operation_event(op_event(f"a{i}", "executing", t - 0.01, v), t - 0.01)
        if i % 2:
            e.device_event(added(device(f"vd{'bcdefghi'[i]}", GIB, None, t + 0.5)), t + 0.5)
            r = only(e.attach(request(f"a{i}", v, GIB, t), t + 1))
        else:
            assert e.attach(request(f"a{i}", v, GIB, t), t + 1) == []
            r = only(e.device_event(added(device(f"vd{'bcdefghi'[i]}", GIB, None, t + 2)), t + 2))
        assert r.error is None and r.proof == "exclusive" and r.operation_id == f"a{i}"
        e.operation_event(op_event(f"a{i}", "completed", t + 2.1, v), t + 2.1)


def test_release_detach_and_reattach_reusing_the_letter() -> None:
    e = engine()
    v = new_volume()
    vdb = device("vdb", GIB, None, 10.5)
    e.device_event(added(vdb), 10.5)
    assert only(e.attach(request("a1", v, GIB, 10.0), 11.0)).device_path == "/dev/vdb"
    assert e.mapping(v) == vdb
    # Detached in CloudStack; the request comes before the device goes.
    assert e.release(ReleaseRequest(operation_id="d1", volume_id=v), 20.0) == []
    r = only(e.device_event(removed(vdb, 20.3), 20.3))
    assert isinstance(r, ReleaseResult) and r.gone and r.operation_id == "d1"
    assert e.mapping(v) is None
    # Re-attach: the same letter is a new appearance, not the old claim.
    vdb2 = device("vdb", GIB, None, 30.5)
    e.device_event(added(vdb2), 30.5)
    r = only(e.attach(request("a2", v, GIB, 30.0), 31.0))
    assert r.device_path == "/dev/vdb" and r.error is None
    # Another volume later gets the letter again after this one is released by path.
    e.device_event(removed(vdb2, 40.0), 40.0)
    r = only(e.release(ReleaseRequest(operation_id="d2", volume_id=v, device_path="/dev/vdb"), 41))
    assert r.gone
    w = new_volume()
    e.device_event(added(device("vdb", GIB, None, 50.5)), 50.5)
    assert only(e.attach(request("a3", w, GIB, 50.0), 51.0)).device_path == "/dev/vdb"


def test_reattach_never_takes_the_released_appearance() -> None:
    """The watcher missed the old device going (or it lingers): after its release timed
    out the volume is attached again; its request must wait for the new appearance."""
    e = engine()
    v = new_volume()
    old = device("vdb", GIB, serial_of(v), 10.5)
    e.device_event(added(old), 10.5)
    assert only(e.attach(request("a1", v, GIB, 10.0), 11.0)).device_path == "/dev/vdb"
    assert e.release(ReleaseRequest(operation_id="d1", volume_id=v), 20.0) == []
    assert not only(e.tick(50.0)).gone
    assert e.attach(request("a2", v, GIB, 60.0), 61.0) == []
    r = only(e.device_event(added(device("vdc", GIB, serial_of(v), 61.5)), 61.5))
    assert r.operation_id == "a2" and r.device_path == "/dev/vdc"


def test_rollback_release_waits_for_every_device_the_failed_attach_could_own() -> None:
    e = engine()
    va, vb = new_volume(), new_volume()
    e.attach(request("a", va, GIB, 10.0), 10.5)
    e.attach(request("b", vb, GIB, 10.1), 10.6)
    vdb, vdc = device("vdb", GIB, None, 11.0), device("vdc", GIB, None, 11.1)
    assert len(e.device_event(added(vdb), 11.0)) == 2  # both ambiguous
    e.device_event(added(vdc), 11.1)
    # A's roll-back: which device was A's is unknown, so both must go.
    assert e.release(ReleaseRequest(operation_id="a", volume_id=va), 12.0) == []
    assert e.device_event(removed(vdb, 12.1), 12.1) == []
    r = only(e.device_event(removed(vdc, 12.5), 12.5))
    assert r.operation_id == "a" and r.gone
    assert only(e.release(ReleaseRequest(operation_id="b", volume_id=vb), 13.0)).gone


def test_release_by_serial_and_path_and_timeout() -> None:
    e = engine()
    v, w = new_volume(), new_volume()
    e.device_event(
        inventory([device("vdb", GIB, serial_of(v), 1.0), device("vdc", GIB, None, 1.0)], 2.0), 2.0
    )
    assert e.release(ReleaseRequest(operation_id="d1", volume_id=v), 3.0) == []
    assert (
        e.release(ReleaseRequest(operation_id="d2", volume_id=w, device_path="/dev/vdc"), 3) == []
    )
    # The device of v goes in an inventory (a rescan found it gone).
    r = only(e.device_event(inventory([device("vdc", GIB, None, 1.0)], 4.0), 4.0))
    assert r.operation_id == "d1" and r.gone
    r = only(e.tick(33.0))
    assert r.operation_id == "d2" and not r.gone and "vdc" in r.message and "30 s" in r.message
    # Nothing of the volume present: gone at once.
    r = only(e.release(ReleaseRequest(operation_id="d3", volume_id=new_volume()), 40.0))
    assert r.gone


def test_watcher_restart_neither_forgets_claims_nor_makes_old_devices_new() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    only(e.attach(request("a", v, GIB, 10.0), 11.0))
    e.device_event(inventory([device("vda", GIB, None, 1.0)], 1.0), 1.0)  # older: ignored
    assert e.mapping(v) is not None
    # The watcher restarts and stamps everything "now".
    w = new_volume()
    e.operation_event(op_event("b", "executing", 20.0, w), 20.0)
    assert e.attach(request("b", w, GIB, 20.0), 20.5) == []
    restamped = [device("vda", GIB, None, 21.0), device("vdb", GIB, None, 21.0)]
    assert e.device_event(inventory(restamped, 21.0, "start"), 21.0) == []
    assert e.mapping(v) is not None
    assert only(e.tick(50.5)).error.code == "device_timeout"


def test_unknown_attaches_at_start_block_exclusion_until_synced() -> None:
    e = CorrelationEngine(VM, now=0.0, timeout=30)
    assert not e.attaches_known
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    assert e.attach(request("a", v, GIB, 10.0), 11.0) == []
    r = only(e.sync_attaches([], 12.0))
    assert r.device_path == "/dev/vdb"


def test_unknown_attaches_time_out_as_ambiguous() -> None:
    e = CorrelationEngine(VM, now=0.0, timeout=30)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    e.attach(request("a", v, GIB, 10.0), 11.0)
    r = only(e.tick(41.0))
    assert r.error.code == "ambiguous_device" and "unseen" in r.error.message


def test_device_seen_before_the_correlator_started_is_never_proven() -> None:
    """A restart loses the claims: a device seen before it may be another volume's."""
    e = engine(100.0)
    v, w = new_volume(), new_volume()
    e.device_event(inventory([device("vdb", GIB, None, 99.5)], 100.0), 100.0)
    r = only(e.attach(request("a", v, GIB, 99.0), 101.0))
    assert r.error.code == "ambiguous_device" and "before the correlator" in r.error.message
    # An attach resumed across the restart whose device comes afterwards is proven.
    e.device_event(added(device("vdc", 2 * GIB, None, 100.5)), 100.5)
    r = only(e.attach(request("b", w, 2 * GIB, 99.9), 101.0))
    assert r.device_path == "/dev/vdc" and r.proof == "exclusive"


def test_a_disk_a_rescan_found_is_judged_by_both_of_its_bounds() -> None:
    """A rescan found it: it came after the previous scan began and before this one ended.
    Whether the correlator watched all along is judged by the earliest, whether an attach
    could own it by the latest: uncertain means ambiguous, never a guess."""
    e = engine(100.0)
    v = new_volume()
    # It may have come before the correlator started (a restart forgot whose it was).
    e.device_event(added(device("vdb", GIB, None, 100.5, after=99.0)), 100.5)
    r = only(e.attach(request("a", v, GIB, 99.5), 101.0))
    assert r.error.code == "ambiguous_device" and "before the correlator" in r.error.message
    # An attach that started while it may have come competes for it.
    w, x = new_volume(), new_volume()
    e.device_event(added(device("vdc", 2 * GIB, None, 112.0, after=110.0)), 112.0)
    e.operation_event(op_event("b", "executing", 111.0, w), 111.0)
    assert e.attach(request("c", x, 2 * GIB, 109.0), 112.5) == []  # b's size unknown: wait
    both = e.attach(request("b", w, 2 * GIB, 111.0), 113.0)
    assert {(r.operation_id, r.error.code) for r in both} == {
        ("b", "ambiguous_device"),
        ("c", "ambiguous_device"),
    }


def test_a_disk_present_before_the_watcher_started_is_never_a_fresh_candidate() -> None:
    """A disk the start scan could not read is announced once readable as present "before
    the watcher started": it is nobody's by exclusion, whatever the time it was read."""
    e = engine()
    v = new_volume()
    assert e.attach(request("a", v, GIB, 10.0), 10.5) == []
    late = device("vdb", GIB, None, 11.0, after=0.0)  # the watcher started at 11.0
    event = DeviceEvent(kind="added", vm_id=VM, at=12.0, source="start", device=late)
    assert e.device_event(event, 12.0) == []
    assert only(e.tick(40.6)).error.code == "device_timeout"


def test_a_reconnect_keeps_the_proofs_a_watcher_restart_does_not() -> None:
    e = engine()
    v = new_volume()
    info = device("vdb", GIB, None, 10.5, after=10.5)
    e.device_event(added(info), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "exclusive"
    rows = [MappedVolume(volume_id=v, operation_id="a")]
    # NATS reconnects: the actor reads the watcher's saved state again, the same stamps.
    e.lose_track("NATS reconnected", 20.0)
    e.device_event(inventory([info], 20.0, "start"), 20.5)
    e.sync_attaches([], 21.0)
    assert e.prove(rows)[0].device_path == "/dev/vdb"
    # The watcher restarts: it lists the disk as there "before it started", after a gap.
    e.device_event(inventory([device("vdb", GIB, None, 30.0, after=0.0)], 30.0, "start"), 30.0)
    assert e.prove(rows)[0].proof == "none"


def test_a_disk_a_start_scan_could_not_read_is_neither_gone_nor_proven() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5, after=10.5)), 10.5)
    only(e.attach(request("a", v, GIB, 10.0), 11.0))
    restarted = DeviceEvent(kind="inventory", vm_id=VM, at=30.0, source="start", unread=("vdb",))
    assert e.device_event(restarted, 30.0) == []
    assert e.prove([MappedVolume(volume_id=v, operation_id="a")])[0].proof == "none"
    # Its release waits for it (it is there), and says it only may be the volume's.
    assert e.release(ReleaseRequest(operation_id="d", volume_id=v), 31.0) == []
    r = only(e.tick(61.0))
    assert not r.gone and "may be volume" in r.message


def test_a_serial_disk_a_start_scan_could_not_read_proves_nothing_until_read() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, serial_of(v), 10.5, after=10.5)), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "serial"
    rows = [MappedVolume(volume_id=v, operation_id="a")]
    restarted = DeviceEvent(kind="inventory", vm_id=VM, at=30.0, source="start", unread=("vdb",))
    e.device_event(restarted, 30.0)
    proof = e.prove(rows)[0]
    assert proof.proof == "none" and "could not be read" in proof.reason
    # Read at last, with the same serial: the volume's disk again.
    late = device("vdb", GIB, serial_of(v), 30.0, after=0.0)
    e.device_event(DeviceEvent(kind="added", vm_id=VM, at=31.0, source="start", device=late), 31.0)
    assert e.prove(rows)[0].proof == "serial"


def test_a_serial_host_never_uses_exclusion() -> None:
    e = engine()
    v, w = new_volume(), new_volume()
    e.device_event(added(device("vdb", GIB, serial_of(v), 10.5)), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "serial"
    e.device_event(added(device("vdc", GIB, None, 20.5)), 20.5)
    assert e.attach(request("b", w, GIB, 20.0), 21.0) == []
    r = only(e.tick(51.0))
    assert r.error.code == "device_timeout" and "serials" in r.error.message


def test_two_devices_with_one_serial_are_ambiguous() -> None:
    e = engine()
    v = new_volume()
    e.device_event(
        inventory(
            [device("vdb", GIB, serial_of(v), 1.0), device("vdc", GIB, serial_of(v), 1.0)], 2.0
        ),
        2.0,
    )
    r = only(e.attach(request("a", v, GIB, 10.0), 11.0))
    assert r.error.code == "ambiguous_device" and "vdb, vdc" in r.error.message


def test_other_vms_are_ignored() -> None:
    e = engine()
    ev = DeviceEvent(
        kind="added", vm_id="other", at=10.5, source="uevent", device=device("vdb", GIB, None, 10.5)
    )
    e.device_event(ev, 10.5)
    assert e.devices() == []
    other = OperationEvent(
        operation_id="x", type="attach", status="executing", vm_id="other", at=iso(10.0)
    )
    e.operation_event(other, 10.0)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "exclusive"


# -- mapping proofs (prove) and resized devices (changed) ------------------------------------


def rows(*pairs: tuple[str, str]) -> list[MappedVolume]:
    return [MappedVolume(volume_id=v, operation_id=o) for v, o in pairs]


def test_after_a_reboot_serials_prove_the_new_names() -> None:
    # A new correlator (the reboot restarted it) sees the disks renamed in another order.
    va, vb, vc = new_volume(), new_volume(), new_volume()
    e = engine(100.0)
    renamed = [
        device("vdb", GIB, serial_of(vc), 99.0),
        device("vdc", GIB, serial_of(vb), 99.0),
        device("vdd", GIB, serial_of(va), 99.0),
    ]
    e.device_event(inventory(renamed, 100.0, "start"), 100.0)
    proofs = e.prove(rows((va, "a"), (vb, "b"), (vc, "c")))
    assert [(p.volume_id, p.device_path, p.proof) for p in proofs] == [
        (va, "/dev/vdd", "serial"),
        (vb, "/dev/vdc", "serial"),
        (vc, "/dev/vdb", "serial"),
    ]


def test_without_serial_only_the_appearance_this_engine_proved_counts() -> None:
    e = engine()
    v, w = new_volume(), new_volume()
    info = device("vdb", GIB, None, 10.5)
    e.device_event(added(info), 10.5)
    r = only(e.attach(request("a", v, GIB, 10.0), 11.0))
    assert r.proof == "exclusive"
    (p,) = e.prove(rows((v, "a")))
    assert (p.device_path, p.proof) == ("/dev/vdb", "exclusive")
    # Another attach's row of the same volume (a re-attach) is not proven by this claim.
    (p,) = e.prove(rows((v, "a2")))
    assert p.proof == "none" and p.device_path is None
    # The disk goes and a same-size one takes its name: a new appearance, proves nothing.
    e.device_event(removed(info, 12.0), 12.0)
    e.device_event(added(device("vdb", GIB, None, 12.1)), 12.1)
    (p,) = e.prove(rows((v, "a")))
    assert p.proof == "none" and "gone" in p.reason
    # A restarted correlator proved nothing: devices without serial name nothing.
    fresh = engine(50.0)
    fresh.device_event(inventory([info], 50.0, "start"), 50.0)
    (p,) = fresh.prove(rows((v, "a")))
    assert p.proof == "none" and p.device_path is None
    assert "restart or a reboot" in p.reason
    (q,) = fresh.prove(rows((w, "x")))
    assert q.proof == "none"


def test_a_detached_or_doubled_serial_proves_nothing() -> None:
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, serial_of(v), 1.0)), 1.0)
    e.device_event(added(device("vdc", GIB, serial_of(v), 1.1)), 1.1)
    (p,) = e.prove(rows((v, "a")))
    assert p.proof == "none" and "vdb, vdc" in p.reason
    e.device_event(removed(device("vdc", GIB, serial_of(v)), 1.2), 1.2)
    assert e.release(ReleaseRequest(operation_id="d", volume_id=v), 1.3) == []
    (p,) = e.prove(rows((v, "a")))
    assert p.proof == "none" and "detached" in p.reason


def changed(info: DeviceInfo, at: float) -> DeviceEvent:
    return DeviceEvent(kind="changed", vm_id=VM, at=at, source="rescan", device=info)


def test_a_resized_device_keeps_its_owner_and_never_proves_another_attach() -> None:
    e = engine()
    owner, waiting = new_volume(), new_volume()
    info = DeviceInfo(name="vdb", path="/dev/vdb", size=GIB, controller="virtio5", appeared_at=10.5)
    e.device_event(added(info), 10.5)
    r = only(e.attach(request("a", owner, GIB, 10.0), 11.0))
    assert r.proof == "exclusive"
    # An attach of 2 GiB waits; the owner's disk grows to 2 GiB meanwhile.
    assert e.attach(request("b", waiting, 2 * GIB, 20.0), 20.5) == []
    grown = DeviceInfo(name="vdb", path="/dev/vdb", size=2 * GIB, controller="virtio5")
    assert e.device_event(changed(grown, 21.0), 21.0) == []
    (p,) = e.prove(rows((owner, "a")))
    assert (p.device_path, p.proof) == ("/dev/vdb", "exclusive")
    assert e.devices()[0].size == 2 * GIB
    # The waiting attach times out: it never got the owner's disk.
    b = only(e.tick(20.5 + 31.0))
    assert b.operation_id == "b" and b.error.code == "device_timeout"


def test_an_unclaimed_device_resized_to_a_waiting_attachs_size_is_not_its_one() -> None:
    e = engine()
    v = new_volume()
    assert e.attach(request("r", v, 2 * GIB, 10.0), 10.2) == []
    # A disk of 1 GiB appears in R's window (another volume's: not R's size)...
    info = DeviceInfo(name="vdb", path="/dev/vdb", size=GIB, controller="virtio5", appeared_at=10.5)
    assert e.device_event(added(info), 10.5) == []
    # ...and grows to R's size: still not R's device.
    grown = DeviceInfo(name="vdb", path="/dev/vdb", size=2 * GIB, controller="virtio5")
    assert e.device_event(changed(grown, 11.0), 11.0) == []
    r = only(e.tick(10.2 + 31.0))
    assert r.operation_id == "r" and r.error.code == "device_timeout"


def test_a_resize_seen_only_in_an_inventory_keeps_the_pending_release_waiting() -> None:
    """The watcher was down while the disk grew: its start scan lists it at the new size,
    with no ``changed``. Still the same disk (same name, serial, controller): not gone."""
    e = engine()
    v = new_volume()
    info = DeviceInfo(
        name="vdb",
        path="/dev/vdb",
        size=GIB,
        serial=serial_of(v),
        controller="virtio5",
        appeared_at=10.5,
    )
    e.device_event(added(info), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "serial"
    assert e.release(ReleaseRequest(operation_id="d", volume_id=v), 20.0) == []
    grown = msgspec.structs.replace(info, size=3 * GIB, appeared_at=21.0)
    assert e.device_event(inventory([grown], 21.0, "start"), 21.0) == []
    assert e.devices()[0].size == 3 * GIB and e.mapping(v) is not None
    r = only(e.tick(50.0))
    assert r.operation_id == "d" and not r.gone and "still present" in r.message


def test_without_serial_a_resize_seen_only_in_an_inventory_is_waited_for_but_doubted() -> None:
    """Without serial, another size after a gap may be the disk resized or another disk
    under its name: the release waits for it and says "may be", ``prove`` names nothing,
    and an attach of the new size is not offered it."""
    e = engine()
    v, w = new_volume(), new_volume()
    info = DeviceInfo(name="vdb", path="/dev/vdb", size=GIB, controller="virtio5", appeared_at=10.5)
    e.device_event(added(info), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "exclusive"
    assert e.attach(request("b", w, 3 * GIB, 20.0), 20.5) == []
    listed = msgspec.structs.replace(info, size=3 * GIB, appeared_at=21.0)
    assert e.device_event(inventory([listed], 21.0, "start"), 21.0) == []
    (p,) = e.prove(rows((v, "a")))
    assert p.proof == "none" and p.device_path is None and "another one" in p.reason
    assert e.release(ReleaseRequest(operation_id="d", volume_id=v), 22.0) == []
    decisions = e.tick(53.0)
    b = next(d for d in decisions if isinstance(d, CorrelateResult))
    assert b.operation_id == "b" and b.error.code == "device_timeout"
    r = next(d for d in decisions if isinstance(d, ReleaseResult))
    assert not r.gone and "which may be volume" in r.message and "resized" in r.message
    # Another size on another controller is another disk: the old one went.
    e.release(ReleaseRequest(operation_id="d2", volume_id=v), 60.0)
    other = msgspec.structs.replace(listed, size=2 * GIB, controller="virtio6")
    r = only(e.device_event(inventory([other], 61.0, "start"), 61.0))
    assert r.operation_id == "d2" and r.gone


def test_without_serial_a_disk_listed_again_after_a_gap_is_doubted_even_at_its_size() -> None:
    """While the watcher was down the volume's disk may have gone and another one of the
    same size taken its name: nothing tells them apart, so the claim proves nothing any
    more, the release waits for the disk and says "may be"."""
    e = engine()
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    assert only(e.attach(request("a", v, GIB, 10.0), 11.0)).proof == "exclusive"
    assert e.device_event(inventory([device("vdb", GIB, None, 21.0)], 21.0, "start"), 21.0) == []
    assert e.mapping(v) is not None
    (p,) = e.prove(rows((v, "a")))
    assert p.proof == "none" and p.device_path is None and "another one under" in p.reason
    assert e.release(ReleaseRequest(operation_id="d", volume_id=v), 22.0) == []
    r = only(e.tick(52.0))
    assert not r.gone and "which may be volume" in r.message and "listed again" in r.message


def test_an_unclaimed_disk_listed_again_after_a_gap_is_no_candidate() -> None:
    """It appeared in R's window, but after the gap it may be another disk under its name
    (one seen before R's window, say): R does not get it."""
    e = CorrelationEngine(VM, now=0.0, timeout=30)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    assert e.attach(request("a", v, GIB, 10.0), 11.0) == []  # attaches not known yet
    assert e.device_event(inventory([device("vdb", GIB, None, 12.0)], 12.0, "start"), 12.0) == []
    assert e.sync_attaches([], 13.0) == []
    r = only(e.tick(41.0))
    assert r.operation_id == "a" and r.error.code == "device_timeout"


# -- executors on other hosts: their times are on another clock -----------------------------

# Another host's clock, and no clock at all (an executor older than the field).
FOREIGN = pytest.mark.parametrize("there", ["boot-id-of-another-host", None])


@FOREIGN
def test_an_executor_clock_behind_never_lets_a_stale_device_in(there: str | None) -> None:
    """Its clock 10 s behind: its started_at (0.0) would open a window that admits vdb,
    seen at 9.0 before the attach existed. The window opens when the correlator first heard
    of the attach (its executing event, 10.0)."""
    e = engine(clock=HERE)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 9.0)), 9.0)  # stale
    e.operation_event(op_event("a", "executing", 0.0, v, clock=there), 10.0)
    assert e.attach(request("a", v, GIB, 0.0, there), 11.0) == []
    r = only(e.device_event(added(device("vdc", GIB, None, 10.5)), 11.5))
    assert (r.operation_id, r.device_path, r.proof) == ("a", "/dev/vdc", "exclusive")


@FOREIGN
def test_a_foreign_request_as_first_news_opens_its_window_on_arrival(there: str | None) -> None:
    """No executing event seen: the request itself is the first news. Its own device
    appeared before (CloudStack's job was over), so it times out, the stale one untaken."""
    e = engine(clock=HERE)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 9.0)), 9.0)
    assert e.attach(request("a", v, GIB, 0.0, there), 11.0) == []
    r = only(e.tick(41.0))
    assert r.error.code == "device_timeout"
    assert "after this correlator learned of the attach" in r.error.message


@FOREIGN
def test_an_executor_clock_ahead_still_gets_the_device_seen_after_its_news(
    there: str | None,
) -> None:
    """Its clock 10 s ahead: its started_at (20.0) would close its window on its own
    device (seen at 10.5). Seen after the executing event came (10.0), the device is its."""
    e = engine(clock=HERE)
    v = new_volume()
    e.operation_event(op_event("a", "executing", 20.0, v, clock=there), 10.0)
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    r = only(e.attach(request("a", v, GIB, 20.0, there), 11.0))
    assert (r.operation_id, r.device_path, r.proof) == ("a", "/dev/vdb", "exclusive")


@FOREIGN
@pytest.mark.parametrize("offset", [-3600.0, -10.0, 10.0, 3600.0])
@pytest.mark.parametrize("via", ["executing", "in flight"])
def test_a_foreign_attach_in_flight_competes_whatever_its_times_say(
    there: str | None, offset: float, via: str
) -> None:
    """A (on this host) and B (another host's clock) in flight, both 1 GiB; vdb is B's.
    B's times, off by ``offset``, must not let A prove vdb by exclusion (ahead, they would
    put vdb before B's window), nor may the time B was heard of: here that is after vdb
    appeared (a late event, an in-flight read after a reconnect)."""
    e = engine(clock=HERE)
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va, clock=HERE), 10.0)
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)  # really B's
    if via == "executing":
        e.operation_event(op_event("b", "executing", 10.1 + offset, vb, clock=there), 10.6)
    else:
        e.lose_track("reconnect", 10.2)
        assert e.sync_attaches([InFlightAttach("b", vb, 10.1 + offset, clock=there)], 10.6) == []
    assert e.attach(request("a", va, GIB, 10.0, HERE), 11.0) == []  # B's size unknown: wait
    r = only(e.attach(request("b", vb, GIB, 10.1 + offset, there), 11.5))
    assert (r.operation_id, r.error.code) == ("a", "ambiguous_device")
    assert "vdb" in r.error.message and "attach b " in r.error.message
    # vdb appeared before the correlator heard of B: B cannot prove it is its own either.
    r = only(e.tick(41.5))
    assert (r.operation_id, r.error.code) == ("b", "device_timeout")


def test_a_foreign_attach_of_another_size_does_not_block() -> None:
    """A foreign competitor fits only devices of its size once that is known."""
    e = engine(clock=HERE)
    va, vb = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va, clock=HERE), 10.0)
    e.operation_event(op_event("b", "executing", 5000.0, vb, clock=None), 10.1)
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    assert e.attach(request("a", va, GIB, 10.0, HERE), 11.0) == []
    r = only(e.attach(request("b", vb, 2 * GIB, 5000.0), 11.5))
    assert (r.operation_id, r.device_path, r.proof) == ("a", "/dev/vdb", "exclusive")


def test_the_same_clock_keeps_the_exact_windows() -> None:
    """Named clocks that match compare as before: SKEW, no more, no less."""
    e = engine(clock=HERE)
    v = new_volume()
    e.device_event(added(device("vdb", GIB, None, 10.0 - 2 * SKEW)), 10.0)  # stale
    e.operation_event(op_event("a", "executing", 9.0, v, clock=HERE), 9.0)
    assert e.attach(request("a", v, GIB, 10.0, HERE), 11.0) == []
    r = only(e.device_event(added(device("vdc", GIB, None, 10.0 - SKEW / 2)), 11.1))
    assert r.device_path == "/dev/vdc"
    # An attach on this host that started after a device appeared is no competitor for it.
    e2 = engine(clock=HERE)
    va, vb = new_volume(), new_volume()
    e2.operation_event(op_event("a", "executing", 10.0, va, clock=HERE), 10.0)
    e2.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    e2.operation_event(op_event("b", "executing", 10.7, vb, clock=HERE), 10.7)
    r = only(e2.attach(request("a", va, GIB, 10.0, HERE), 11.0))
    assert (r.operation_id, r.device_path) == ("a", "/dev/vdb")


def test_a_timed_out_attach_left_attached_taints_new_devices_until_it_is_detached() -> None:
    """An attach that timed out on a host without serials and could not be rolled back (its
    volume is still attached) may see its device appear any time later: that device is never
    proven another same-size attach's by exclusion, however late, until the volume's detach
    ends the doubt."""
    e = engine()
    va, vb, vc = new_volume(), new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, va), 10.0)
    assert e.attach(request("a", va, GIB, 10.0), 11.0) == []
    r = only(e.tick(11.0 + TIMEOUT))
    assert r.operation_id == "a" and r.error.code == "device_timeout"
    failed = op_event("a", "failed", 42.0, va)
    failed.attached = True  # the roll-back's detach failed: still attached
    e.operation_event(failed, 42.0)
    e.tick(100.0)  # long past the linger
    e.operation_event(op_event("b", "executing", 100.0, vb), 100.0)
    assert e.attach(request("b", vb, GIB, 100.0), 101.0) == []
    # va's device appears at last: b must not be handed it.
    vdb = device("vdb", GIB, None, 101.5)
    out = e.device_event(added(vdb), 101.5) + e.tick(101.0 + TIMEOUT)
    assert not any(getattr(d, "device_path", None) == "/dev/vdb" for d in out), out
    b_failed = op_event("b", "failed", 133.0, vb)
    b_failed.attached = False
    e.operation_event(b_failed, 133.0)
    # Once va is detached, new devices are no longer its.
    detached = OperationEvent(
        operation_id="d",
        type="detach",
        status="completed",
        volume_id=va,
        vm_id=VM,
        at=iso(150.0),
        attached=False,
    )
    e.operation_event(detached, 150.0)
    e.device_event(removed(vdb, 150.5), 150.5)
    e.tick(160.0)
    e.operation_event(op_event("c", "executing", 170.0, vc), 170.0)
    e.device_event(added(device("vdc", GIB, None, 170.5)), 170.5)
    r = only(e.attach(request("c", vc, GIB, 170.0), 171.0))
    assert r.error is None and r.device_path == "/dev/vdc"


def test_a_rejected_copy_of_an_attach_id_does_not_end_the_attach() -> None:
    """Another command that re-used the attach's id is rejected `conflict` on the same
    subject: its event is not the attach's end (the attach still gets its device)."""
    e = engine()
    v, other = new_volume(), new_volume()
    e.operation_event(op_event("a", "executing", 10.0, v), 10.0)
    copy = op_event("a", "rejected", 10.2, other)
    copy.rejected_copy = 7
    e.operation_event(copy, 10.2)
    e.device_event(added(device("vdb", GIB, None, 10.5)), 10.5)
    r = only(e.attach(request("a", v, GIB, 10.0), 11.0))
    assert r.error is None and r.device_path == "/dev/vdb"
