"""The device watcher: reports the host's block devices on ``volumed.device.<vm_id>``.

Two paths feed one authoritative ``known`` dict through the same diff, so nothing is
reported twice: kernel uevents (primary, when sysfs is the real /sys and netlink opens) and
a rescan every ``poll_interval`` seconds (the only path otherwise, reconciliation always).
Observation is synchronous and never awaits between reading sysfs and updating ``known``;
events go to one ordered outbox that a single task publishes, retrying while NATS is away.

**When a disk appeared** (``DeviceInfo.appeared_after``/``appeared_at``, an interval on this
host's clock) is when the kernel announced it, never when some read happened to see it:

- a disk a uevent names, read at once: the arrival of that uevent (both bounds);
- a disk the settle re-read finds (its uevent came before sysfs showed it, or another disk
  took the name meanwhile): between that uevent and the re-read;
- a disk a rescan finds that no uevent announced (netlink missed it, or rescans are the only
  path): between the start of the previous successful scan (it was not there yet) and the end
  of this one (it was there by then). The correlator takes such a disk as come anywhere in
  the interval (see the engine's rules 1, 4 and 5);
- a disk present at the start scan: ``appeared_after`` 0.0 ("before the watcher started")
  and ``appeared_at`` the start scan. So is a disk that existed then but could not be read
  (listed as ``unread``; announced ``added`` with ``source="start"`` once readable, never
  with a fresh time, or ``removed`` if it goes first).
A disk keeps its pair for as long as it is the same disk (a resize, a late by-id link).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from msgspec.structs import replace

from actors.heartbeat import beat, raise_if_cancelled
from actors.metrics import DEVICE_EVENTS
from actors.watcher import sysfs
from actors.watcher.netlink import UeventSocket, add_reader, parse_uevent
from actors.watcher.state import Change, diff, diff_one, same_device
from bus import Bucket, Bus
from bus.tasks import Backoff
from bus.topology import DEVICES_BUCKET, device_subject
from schemas.config import Settings
from schemas.devices import DeviceEvent, DeviceInfo, DeviceSnapshot
from schemas.internal import CheckResult

log = logging.getLogger("volumed.watcher")

Source = Literal["uevent", "rescan", "start"]
Times = tuple[float, float]  # (appeared_after, appeared_at) of a disk that appears

# A uevent can precede the sysfs attribute it announces (a loop device's size on detach);
# the device is read once more this long after, and the diff drops what was already seen.
_SETTLE = 0.2
_BY_ID_POLL = 0.02


class WatcherActor:
    """Watches the block devices of the VM this host is and publishes DeviceEvents."""

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        vm_id: str,
        instance: str,
        *,
        use_uevents: bool = True,
        by_id_grace: float = 1.0,
        heartbeat_interval: float = 5.0,
    ) -> None:
        """``by_id_grace``: how long an ``added`` device with a serial may wait for udev to
        create its by-id link before it is published without one (only where
        ``$dev/disk/by-id`` exists)."""
        self.bus = bus
        self.settings = settings
        self.vm_id = vm_id
        self.instance = instance
        self.use_uevents = use_uevents
        self.by_id_grace = by_id_grace
        self.heartbeat_interval = heartbeat_interval
        self.subject = device_subject(vm_id)

        self.known: dict[str, DeviceInfo] = {}
        self.ready = asyncio.Event()  # set once the inventory is in the outbox
        # Counters, for health, tests and benchmarks.
        self.uevents_seen = 0  # kernel uevents received (any subsystem)
        self.uevents_matched = 0  # watched disks named by uevents (once per name and read)
        self.rescans = 0  # successful full rescans
        self.events_published = 0
        self.uevents_active = False
        self.uevent_problem: str | None = None  # why uevents are not used, when they are not
        self.scan_error: str | None = None
        self.publish_error: str | None = None
        self.last_scan: float | None = None  # time.monotonic() of the last successful scan
        self.started = time.monotonic()

        self._outbox: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self._socket: UeventSocket | None = None
        self._stop_reader: Callable[[], None] | None = None
        self._settles: dict[str, asyncio.TimerHandle] = {}
        self.start_at: float | None = None  # time.time() of the start scan
        self._scan_began = 0.0  # time.time() when the last successful scan began
        # Names that exist but could not be read, and were not known: when they appeared,
        # as far as was known then (the start scan's: "before the watcher started").
        self._unseen: dict[str, Times] = {}
        # Events of a disk whose ``added`` waits for its by-id link, in order: later events of
        # that disk wait behind it, those of other disks do not.
        self._held: dict[str, list[DeviceEvent]] = {}
        self._link_waits: set[asyncio.Task[None]] = set()
        self._msg_prefix = f"{instance}-{uuid.uuid4().hex[:8]}"
        self._stopped = False
        self._running: asyncio.Task[Any] | None = None

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch until stopped or cancelled."""
        if self._stopped:
            return
        self._running = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeat_loop())
                tg.create_task(self._publish_loop())
                # Listen before the first scan, so that nothing falls between the two.
                self._open_uevents()
                await self._initial_scan()
                tg.create_task(self._rescan_loop())
        finally:
            self._running = None
            self._close_uevents()
            for task in list(self._link_waits):
                task.cancel()

    def stop(self) -> None:
        """Stop watching. The watcher holds no work worth finishing (what it has not published
        yet, the next start's scan finds again), so ``run`` is cancelled."""
        self._stopped = True
        if self._running is not None:
            self._running.cancel()

    def _open_uevents(self) -> None:
        if not self.use_uevents:
            self.uevent_problem = "uevents disabled"
            return
        if os.path.realpath(self.settings.sysfs) != os.path.realpath("/sys"):
            self.uevent_problem = f"sysfs is {self.settings.sysfs}, not /sys"
            return
        try:
            self._socket = UeventSocket()
        except OSError as e:
            self.uevent_problem = f"netlink unavailable ({e.strerror or e})"
            log.warning("device watcher: %s; rescanning sysfs only", self.uevent_problem)
            return
        self._stop_reader = add_reader(self._socket, self._on_uevents, asyncio.get_running_loop())
        self.uevents_active = True

    def _close_uevents(self) -> None:
        for timer in self._settles.values():
            timer.cancel()
        self._settles.clear()
        if self._stop_reader is not None:
            self._stop_reader()
            self._stop_reader = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self.uevents_active = False

    async def _initial_scan(self) -> None:
        """The first scan is published as one inventory; present devices are not "added".
        Until sysfs can be read, nothing is claimed (health says why)."""
        while True:
            began = time.time()
            try:
                found, unreadable = sysfs.scan_detailed(
                    self.settings.sysfs, self.settings.dev, self.settings.devices
                )
                break
            except OSError as e:
                self._scan_failed(e)
                await asyncio.sleep(self.settings.poll_interval)
        at = time.time()
        self._scan_ok(began)
        self.start_at = at
        # Present before the watcher started: since when, nobody can tell.
        start: Times = (0.0, at)
        self.known = {name: _stamped(info, start) for name, info in found.items()}
        # Unreadable now, yet there: when readable it is announced with these times.
        self._unseen = dict.fromkeys(unreadable, start)
        self._outbox.put_nowait(
            DeviceEvent(
                kind="inventory",
                vm_id=self.vm_id,
                at=at,
                source="start",
                devices=tuple(self.known[n] for n in sorted(self.known)),
                unread=tuple(sorted(unreadable)),
                watcher=self.instance,
            )
        )
        self.ready.set()
        log.info(
            "device watcher: %d devices (%s); %s",
            len(self.known),
            ", ".join(sorted(self.known)) or "none",
            "uevents + rescan" if self.uevents_active else f"rescan only: {self.uevent_problem}",
        )

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            self.rescan()

    # -- observing --------------------------------------------------------------------------

    def _on_uevents(self) -> None:
        """Readable netlink socket: re-read each watched disk a uevent names."""
        assert self._socket is not None
        try:
            messages, overflowed = self._socket.receive()
        except OSError as e:
            log.warning("device watcher: netlink read failed: %s", e)
            return
        at = time.time()
        self.uevents_seen += len(messages)
        if not self.ready.is_set():
            return  # the initial scan, still to come, sees this state anyway
        names: list[str] = []
        for raw in messages:
            event = parse_uevent(raw)
            if event is None or not event.is_block_disk:
                continue
            if sysfs.matches(event.name, self.settings.devices) and event.name not in names:
                names.append(event.name)
        self.uevents_matched += len(names)
        loop = asyncio.get_running_loop()
        for name in names:
            self.observe(name, "uevent", at)  # read at once: the uevent's arrival is when
            pending = self._settles.pop(name, None)
            if pending is not None:
                pending.cancel()
            self._settles[name] = loop.call_later(_SETTLE, self._settle, name, at)
        if overflowed:
            log.warning("device watcher: uevents were lost (receive buffer full); rescanning")
            self.rescan()

    def _settle(self, name: str, at: float) -> None:
        self._settles.pop(name, None)
        # A disk found only now came between the uevent and this read (that uevent's time
        # alone would be too early: another disk may have taken the name since).
        self.observe(name, "uevent", at, settled=True)

    def observe(
        self, name: str, source: Source, announced: float, *, settled: bool = False
    ) -> list[Change]:
        """Re-read one device that the uevent arriving at ``announced`` named and publish
        what changed against ``known``. A disk found is stamped with that arrival, or, for a
        re-read some time after it (``settled``), between the uevent and this read."""
        try:
            new = sysfs.read_device(self.settings.sysfs, self.settings.dev, name)
        except OSError as e:
            log.debug("device watcher: %s unreadable now (%s); the next scan retries", name, e)
            if name not in self.known:
                self._unseen.setdefault(name, (announced, time.time()))
            return []
        read = time.time() if settled else announced
        if new is None and name in self._unseen:
            self._unread_gone(name, source, read)
        old = self.known.get(name)
        if new is not None:
            if old is not None and same_device(old, new) and old.by_id_path:
                new = replace(new, by_id_path=old.by_id_path)
            else:
                new = replace(new, by_id_path=sysfs.find_by_id(self.settings.dev, name, new.serial))
        return self._apply(diff_one(old, new), source, read, (announced, read))

    def rescan(self) -> list[Change]:
        """Read every watched device and publish what differs from ``known``. A disk found
        here that no uevent announced appeared after the previous scan began (it was not
        there then) and before this one ended."""
        began = time.time()
        try:
            seen, unreadable = sysfs.scan_detailed(
                self.settings.sysfs, self.settings.dev, self.settings.devices, resolve_by_id=False
            )
        except OSError as e:
            self._scan_failed(e)
            return []
        at = time.time()
        since = self._scan_began
        self._scan_ok(began)
        self.rescans += 1
        for name in list(self._unseen):
            if name not in seen and name not in unreadable:
                self._unread_gone(name, "rescan", at)
        for name in unreadable - self.known.keys():
            self._unseen.setdefault(name, (since, at))
        links: dict[str, list[str]] | None = None
        for name, info in seen.items():
            old = self.known.get(name)
            if old is not None and same_device(old, info) and (old.by_id_path or not info.serial):
                seen[name] = replace(info, by_id_path=old.by_id_path)
            else:  # new, replaced, or still waiting for its link: look in by-id once
                if links is None:
                    links = sysfs.by_id_links(self.settings.dev)
                seen[name] = replace(
                    info, by_id_path=sysfs.pick_by_id(links.get(name, ()), info.serial)
                )
        for name in unreadable & self.known.keys():
            seen[name] = self.known[name]  # neither present nor absent: keep what we knew
        return self._apply(diff(self.known, seen), "rescan", at, (since, at))

    def _apply(
        self, changes: list[Change], source: Source, at: float, appeared: Times
    ) -> list[Change]:
        """Record and announce ``changes`` observed at ``at``; a disk that appears is
        stamped ``appeared``, unless it was there unread since earlier (then with when it
        was first known to be there: before the watcher started, for the start scan's)."""
        for kind, info in changes:
            if kind == "removed":
                self.known.pop(info.name, None)
                self._emit("removed", info, source, at)
            elif kind == "added":
                times, how = appeared, source
                unseen = self._unseen.pop(info.name, None)
                if unseen is not None:
                    times = (min(unseen[0], appeared[0]), unseen[1])
                    how = "start" if times[0] == 0.0 else source
                info = _stamped(info, times)
                self.known[info.name] = info
                self._emit("added", info, how, at)
            elif kind == "changed":  # resized: the same disk, seen since it first was
                info = _stamped_as(info, self.known[info.name])
                self.known[info.name] = info
                self._emit("changed", info, source, at)
            else:  # a late by-id link of the same disk: recorded, not announced
                self.known[info.name] = _stamped_as(info, self.known[info.name])
        return changes

    def _unread_gone(self, name: str, source: Source, at: float) -> None:
        """A disk listed as unread (in the start inventory or a snapshot) went before it
        could be read: ``removed``, so that no reader keeps it as still there."""
        del self._unseen[name]
        gone = DeviceInfo(name=name, path=os.path.join(self.settings.dev, name), size=0)
        self._emit("removed", gone, source, at)

    def _emit(
        self,
        kind: Literal["added", "removed", "changed"],
        info: DeviceInfo,
        source: Source,
        at: float,
    ) -> None:
        log.info(
            "device %s %s (%d bytes, serial %s) via %s",
            info.name,
            kind,
            info.size,
            info.serial,
            source,
        )
        event = DeviceEvent(
            kind=kind, vm_id=self.vm_id, at=at, source=source, device=info, watcher=self.instance
        )
        held = self._held.get(info.name)
        if held is not None:
            held.append(event)  # behind this disk's ``added``, still waiting for its link
        elif kind == "added" and self._may_get_link(info):
            self._held[info.name] = [event]
            task = asyncio.get_running_loop().create_task(self._wait_for_by_id(info.name))
            self._link_waits.add(task)
            task.add_done_callback(self._link_waits.discard)
        else:
            self._outbox.put_nowait(event)

    def _scan_ok(self, began: float) -> None:
        self.last_scan = time.monotonic()
        self._scan_began = began
        self.scan_error = None

    def _scan_failed(self, e: OSError) -> None:
        if self.scan_error is None:
            log.error("device watcher: cannot scan %s/block: %s", self.settings.sysfs, e)
        self.scan_error = str(e)

    # -- publishing -------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        """Publish the outbox in order; a NATS outage delays events, never drops them."""
        snapshots: Bucket[DeviceSnapshot] | None = None
        seq = 0
        while True:
            event = await self._outbox.get()
            seq += 1
            backoff = Backoff(0.1, 5.0)
            while True:
                try:
                    # The id makes a retry after a lost acknowledgement a no-op in the stream.
                    await self.bus.publish(self.subject, event, msg_id=f"{self._msg_prefix}-{seq}")
                    break
                except Exception as e:
                    raise_if_cancelled()
                    if self.publish_error is None:
                        log.warning("device watcher: cannot publish device event: %s", e)
                    self.publish_error = f"{type(e).__name__}: {e}"
                    await backoff.pause()
            self.publish_error = None
            self.events_published += 1
            DEVICE_EVENTS.labels(event.kind, event.source).inc()
            raise_if_cancelled()
            if self._outbox.empty():
                # The snapshot follows the stream (written once a burst is out), for late
                # or restarted readers; the events are what matters, so failures only log.
                try:
                    if snapshots is None:
                        snapshots = await self.bus.bucket(DEVICES_BUCKET, DeviceSnapshot)
                    await snapshots.put(
                        self.vm_id,
                        DeviceSnapshot(
                            vm_id=self.vm_id,
                            watcher=self.instance,
                            at=event.at,
                            devices=tuple(self.known[n] for n in sorted(self.known)),
                            seq=seq,
                            unread=tuple(sorted(self._unseen)),
                        ),
                    )
                except Exception as e:
                    log.debug("device watcher: snapshot not written: %s", e)
                raise_if_cancelled()

    def _may_get_link(self, info: DeviceInfo) -> bool:
        """Whether udev may still create the by-id link of a disk that has none yet (it has
        a serial, and udev runs here)."""
        return (
            info.by_id_path is None
            and info.serial is not None
            and self.by_id_grace > 0
            and self._has_by_id_dir()
        )

    async def _wait_for_by_id(self, name: str) -> None:
        """udev creates by-id links just after the kernel announces a disk: give it a moment
        so that the ``added`` event carries the stable path. Only this disk's events wait
        (they are held, in order); the outbox, and every other disk, go on."""
        held = self._held[name]
        try:
            first = held[0]
            info = first.device
            assert info is not None
            deadline = time.monotonic() + self.by_id_grace
            # A later event of the disk (it went, or was resized) ends the wait.
            while time.monotonic() < deadline and len(held) == 1:
                await asyncio.sleep(_BY_ID_POLL)
                link = sysfs.find_by_id(self.settings.dev, name, info.serial)
                if link:
                    current = self.known.get(name)
                    if current is not None and same_device(current, info):
                        self.known[name] = replace(current, by_id_path=link)
                    held[0] = replace(first, device=replace(info, by_id_path=link))
                    break
        finally:
            del self._held[name]
            for event in held:
                self._outbox.put_nowait(event)

    def _has_by_id_dir(self) -> bool:
        return os.path.isdir(os.path.join(self.settings.dev, "disk", "by-id"))

    # -- health -----------------------------------------------------------------------------

    def check(self) -> CheckResult:
        """The ``device_watcher`` health check."""
        interval = self.settings.poll_interval
        now = time.monotonic()
        since = now - (self.last_scan if self.last_scan is not None else self.started)
        if since > 3 * interval:
            return CheckResult(
                status="down",
                detail=f"no successful sysfs scan for {since:.0f} s: "
                f"{self.scan_error or 'not scanning'}",
            )
        age = f"{since:.1f} s ago" if self.last_scan is not None else "pending (starting)"
        state = f"every {interval:g} s, {len(self.known)} devices, last scan {age}"
        status = "ok"
        if self.uevents_active:
            detail = f"uevents + rescan {state}"
        elif self.uevent_problem and self.uevent_problem.startswith("netlink"):
            status = "degraded"
            detail = f"rescan only: {self.uevent_problem}; {state}"
        else:
            detail = f"rescan only ({self.uevent_problem}) {state}"
        if self.publish_error:
            status = "degraded"
            detail += f"; cannot publish ({self._outbox.qsize()} events queued): "
            detail += self.publish_error
        return CheckResult(status=status, detail=detail)

    async def _heartbeat_loop(self) -> None:
        async def checks() -> dict[str, CheckResult]:
            return {"device_watcher": self.check()}

        await beat(self.bus, "watcher", self.instance, self.heartbeat_interval, checks)


def _stamped(info: DeviceInfo, times: Times) -> DeviceInfo:
    return replace(info, appeared_after=times[0], appeared_at=times[1])


def _stamped_as(info: DeviceInfo, old: DeviceInfo) -> DeviceInfo:
    """``info`` with the appearance times of ``old`` (the same disk)."""
    return replace(info, appeared_after=old.appeared_after, appeared_at=old.appeared_at)
