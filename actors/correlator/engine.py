"""Which local block device is which volume: decided by proof, never by guess.

The engine is pure: no I/O, no clock of its own. The actor feeds it the watcher's device
events, the executor's attach/detach hand-offs and operation events, and the time; it
answers with ``CorrelateResult`` / ``ReleaseResult`` decisions. A wrong mapping is the worst
failure volumed can have, so wherever a proof is missing the answer is an explicit
``ambiguous_device`` or ``device_timeout`` (and the executor rolls the attach back).

**By serial** (``proof="serial"``). On KVM, CloudStack gives each disk the serial
``serial_of(volume_id)``. A present device with exactly that serial *is* the volume, whenever
it appeared (often before the executor's request arrives, so unclaimed devices are kept).
Concurrent attaches never interfere: each looks for its own serial. Two present devices with
one serial are reported as ambiguous. Once a volume's device has shown its serial, this host
is known to give serials and the method below is no longer used on it.

**Without serial: proof by exclusion** (``proof="exclusive"``). A device without serial is
the volume of attach R only if all of this holds:

1. *It appeared in R's window*: it appeared at or after ``R.started_at - SKEW``.
   ``started_at`` is taken just before the attach is sent and the watcher stamps a device
   with when the kernel announced it, with the same host clock, so R's device cannot appear
   before R's window opens; a device that appeared earlier is stale and never taken. When
   the watcher only knows an interval (a rescan found the disk: between the previous scan
   and this one), the device may be in R's window if the interval ends in it: it is then a
   candidate, every other attach it may belong to (rule 4, judged by the same end) competes
   for it, a failed one taints it, and it proves R only if it came after this correlator
   started even at the interval's start (rule 5), so that whatever attach made it is one
   this correlator follows. An uncertain time costs an ``ambiguous_device``, never a guess.
   ``SKEW`` (50 ms) only absorbs timestamp granularity and clock slew. It is far shorter
   than any CloudStack attach takes to reach a guest (API call, job, agent command, PCI
   hot-plug), so it does not reopen the seed's 5 s "contemporary" window. If R's executor
   runs on another host, R's window opens when this correlator first learned of R instead
   (below).
2. *Its size equals R's size exactly*, it is not claimed by an earlier answer, and it is not
   the device of a volume detached since.
3. *It is R's only such device*: with two, both could be R's, so R is ambiguous at once.
4. *No other attach could own it.* Every other attach to this VM whose window and size fit
   the device is a competitor: one whose request waits too (same size) makes both
   ambiguous at once; one known only from its ``executing`` event (size unknown until its
   request comes) makes R wait, and R fails ``ambiguous_device`` if its time-out comes first.
   A competitor's window opens at the earliest time known of it (``executing``'s ``at``,
   ``accepted_at``, ``started_at``, less ``SKEW``); for one on another host's clock, always.
5. *It appeared after this correlator started*, even at the earliest its interval allows
   (claims live in memory: a device seen before may already be another volume's), and it
   is not *tainted*.

Why two volumes attached at the same time cannot be confused: requests arrive only after
CloudStack's job finished, so "the only open request" is not enough. B's device may appear,
and A's request arrive, before B's request does. The executor's ``executing`` event (published
before the attach is sent) makes B a competitor from the start, so a device that appears
while A and B are in flight fits both windows and is only ever mapped when the sizes tell A
and B apart. Otherwise both fail and are rolled back. An attach that failed (or ended
without a device) taints the devices it could own until they go, and for ``linger`` seconds
after its terminal event also new ones, so its late device is never given to another
attach. Attaches that may have started while nothing was listening (process start, NATS
reconnect) count as one "unknown" competitor that blocks every exclusion proof until the
actor has read the in-flight attaches from the attaching bucket again.

**Executors on other hosts.** The watcher and this correlator run on the VM's host, an
executor on any host. A time the executor stamped (``executing``'s ``at``, the attaching
bucket's ``accepted_at`` and ``started_at``, the request's ``started_at``) is compared with
the watcher's stamps only if it is stamped with this engine's ``clock`` (Settings.clock: one
boot of one host). Another clock may be off by any amount: behind, it would let a stale
device into R's window (a wrong mapping); ahead, it would shrink a competitor's window so
that R takes the competitor's device (a wrong mapping too). A time without a clock (an
executor older than the field) counts as another host's. For such an attach the engine uses
only its own clock, each time on the side where an error costs a failed attach and never a
wrong mapping:

- *as R* (its own window), it opens when this correlator first learned of R: the receipt
  of its ``executing`` event, of the in-flight read that listed it, or of its request,
  whichever came first. Opening after R was sent only costs R its device (a time-out and a
  roll-back), never a wrong one. It may also open a little before the send (``executing``
  precedes it), but a device first seen after the correlator knew of R is no stale one: it
  is another attach's, which competes for it (rule 4) or has tainted it, as for any device
  seen inside a window;
- *as a competitor* of another attach, its window is open since always: it may own any
  device of its size (any, while its size is unknown), whenever that appeared. Earlier is
  safe there; it costs the other attach a wait or an ``ambiguous_device``.

So an executor on another host costs attaches of the same size that overlap it their proof
by exclusion, and its own attach its device when that appeared before the correlator heard
of it; attaches on the correlator's host keep their exact windows.

Requirements on the others: every attach to this VM goes through volumed (a disk
hot-plugged by hand inside a window of the same size would be indistinguishable); the
executor publishes ``executing`` before it sends an attach and ``failed`` only after the
roll-back detach is done, and names the clock of every time it hands over (``clock``); the
watcher stamps a device with when the kernel announced it, as an interval
(``appeared_after``/``appeared_at``) when it only knows bounds, and what its start scan
finds (or could not read then) as present "before it started" (``appeared_after`` 0): such
a device counts as present since an unknown time, before any attach the watcher could have
seen, and is never a candidate. A watcher older than ``appeared_after`` stamped one time,
taken as both bounds; what its start scan lists counts as present since an unknown time.

**Proving mappings again** (``prove``). A mapping recorded earlier names a kernel name, and
the kernel may give that name to another disk (a reboot names disks again, in any order). A
mapped volume is proven again by the one present device with its serial, or by the device
without serial that this engine itself proved for that same attach, as long as that
appearance is present and not doubted (below); otherwise it names no device, with the
reason. A restarted engine has proven nothing, so devices without serial name nothing after
a restart.

**Resized disks.** A resized disk is the same disk. The watcher reports a resize as
``changed`` (same name, serial and controller, a new size), and the device keeps its
appearance: its owner, its claim, when it was first seen; a pending release still waits for
it. It is never a candidate for an attach by exclusion (a disk that came with another size
is not the one an attach of its new size made).

**Inventories** (the watcher's start scan, the saved device state) follow a gap nobody
watched. An entry under the name of a present appearance, with its serial and its size, or
its serial and controller and another size (a resize seen only there, a resize as above), is
that appearance, never a removal plus a new device, which would answer its volume's release
``gone`` while its disk is still there. With a serial this is proof enough: the serial is
the volume's. Without serial nothing is proven either way: in the gap the disk may have been
detached and another one, of any size, attached under its name on the same controller (the
kernel hands out the lowest free name and virtio index again); a ``changed`` is different,
the watcher reports it only for a disk it kept observing. So the engine takes the side where
neither error is possible: the device keeps its appearance (its volume's release waits for
it) and is *doubted* until it goes: it is never a candidate by exclusion, ``prove`` names it
for no volume, and a release that times out on it says it only *may* be the volume's. A
watcher restart thus costs mappings without serial their proof, as a correlator restart
does. A name the start scan lists as ``unread`` (there, but not readable) is neither gone
nor known to be the same disk: the appearance under it stays (its release waits), proves
nothing, not even by its old serial, until it is read again (``added`` with
``source="start"``: then as if listed), and without serial is doubted too.

A NATS reconnect is no such gap for the watcher: the actor reads the watcher's saved state
again, and an entry with the appearance's own times (the watcher stamps each appearance once;
a restarted one stamps what it lists with its own start) is that very appearance, not listed
again after a gap: it keeps its proof. A reconnect costs no mapping its proof.

**Releases.** A ``ReleaseRequest`` (the volume was detached in CloudStack) is answered
``gone=True`` as soon as the volume's device (the appearance it was mapped to, else the one
with its serial, else the given path if that device has no serial and no other owner) is
absent or removed, ``gone=False`` with the reason after ``release_timeout``. Claims belong to
one appearance: a letter reused later is a new device.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from msgspec.structs import replace

from schemas.common import GIB, TERMINAL, ErrorCode, epoch_of, serial_of
from schemas.devices import DeviceEvent, DeviceInfo, MappedVolume, ProvenMapping, identity_of
from schemas.events import ErrorInfo, OperationEvent
from schemas.internal import (
    CorrelateRequest,
    CorrelateResult,
    ReleaseRequest,
    ReleaseResult,
)

SKEW = 0.05
"""Seconds a device may be stamped before its attach's ``started_at`` (granularity only)."""

Decision = CorrelateResult | ReleaseResult

_NEVER = math.inf
_UNKNOWN = -math.inf  # a time we cannot know: "at any time before"
_CACHE_MAX = 10_000

_R = TypeVar("_R", CorrelateResult, ReleaseResult)

ClaimantKind = Literal["announced", "open", "failed", "unknown"]


@dataclass(frozen=True)
class InFlightAttach:
    """An attach to this VM that may be running in CloudStack (from the attaching bucket)."""

    operation_id: str
    volume_id: str | None = None
    started_at: float = _UNKNOWN
    size: int | None = None
    clock: str | None = None  # whose clock started_at is on (the executor's)


@dataclass
class _Device:
    """One appearance of a block device: a letter reused later is another appearance."""

    key: int
    info: DeviceInfo
    # When it appeared, as the watcher knows it: at the latest ``seen_at``, at the earliest
    # ``seen_after`` (equal for a disk a uevent announced; -inf for both: present since an
    # unknown time, before any attach the watcher could have seen).
    seen_at: float
    seen_after: float
    claimed_by: str | None = None  # the attach operation answered with this device
    volume_id: str | None = None
    taint: str | None = None  # why it may belong to a failed attach: never proven by exclusion
    released: bool = False  # its volume was detached since: never the volume's device again
    suspects: set[str] = field(default_factory=set)  # volumes of failed attaches it may be
    # Its size changed since it appeared (``changed``): a disk that came with another size
    # is not one an attach of its new size made, so it never proves one by exclusion.
    resized: bool = False
    # Why it may be another disk than the one it was (listed again without serial after a
    # gap): still waited for as its volume's, but never proven to be it, or anyone's, again.
    doubt: str | None = None
    # Listed as unread by a start scan after a gap: what it is now (its serial too) is not
    # known until it is read again, so no serial proves anything by it meanwhile.
    unread: bool = False


@dataclass
class _Claimant:
    """An attach that may own a device: announced, waiting, failed, or not known at all."""

    operation_id: str
    kind: ClaimantKind
    window_start: float  # as a competitor: its device cannot have been seen before this
    size: int | None  # None: unknown, fits any size
    volume_id: str | None
    learned_at: float = _UNKNOWN  # when this engine first heard of it (its own clock)
    expires: float = _NEVER  # announced/failed/unknown: forgotten (and its devices tainted)
    request: CorrelateRequest | None = None
    own_start: float = _NEVER  # open: its own candidates were seen at or after this
    deadline: float = _NEVER  # open: when it times out
    reason: str = ""  # unknown: why the engine may have missed attaches


@dataclass
class _Release:
    request: ReleaseRequest
    targets: dict[int, str]  # device key → name: every device that may be the volume's
    deadline: float
    doubt: str  # why the targets may only be the volume's device; "": they are its own


class CorrelationEngine:
    """Pure decision logic of one VM's correlator. Every method takes ``now`` (time.time())
    and returns the decisions it made, in order; the caller publishes them."""

    def __init__(
        self,
        vm_id: str,
        *,
        now: float,
        timeout: float = 30.0,
        release_timeout: float = 30.0,
        horizon: float = 930.0,
        linger: float = 5.0,
        attaches_known: bool = False,
        clock: str | None = None,
    ) -> None:
        """``horizon``: seconds after which an attach that never reported its end is
        forgotten (longer than any CloudStack job plus the correlation timeout).
        ``linger``: seconds a failed attach still taints new devices after its terminal
        event (longer than the watcher's observation lag, i.e. its rescan interval).
        ``attaches_known=False`` (the safe default) means attaches may be in flight that the
        engine has not heard of; call ``sync_attaches`` once they are known.
        ``clock``: the clock ``now`` and the watcher's stamps are on (Settings.clock); an
        executor's time is compared with them only if it is stamped with the same clock."""
        self.vm_id = vm_id
        self.clock = clock
        self.timeout = timeout
        self.release_timeout = release_timeout
        self.horizon = horizon
        self.linger = linger
        # Devices seen before this may have been mapped by an earlier correlator (claims
        # live in memory): they are never proven by exclusion.
        self.watch_since = now
        self.serial_host = False  # a volume's device had its serial: exclusion never used
        self._devices: dict[str, _Device] = {}  # present devices by kernel name
        self._next_key = 0
        self._state_at = _UNKNOWN  # `at` of the latest inventory applied
        self._event_at = _UNKNOWN  # `at` of the latest device event applied
        self._claimants: dict[str, _Claimant] = {}
        self._releases: dict[str, _Release] = {}
        self._answers: OrderedDict[str, tuple[float, CorrelateResult]] = OrderedDict()
        self._released: OrderedDict[str, tuple[float, ReleaseResult]] = OrderedDict()
        self._ended: OrderedDict[str, float] = OrderedDict()  # operations that ended, when
        # The appearance each volume was last mapped to, kept after it is gone: a release
        # then knows its device went even when the letter was reused since.
        self._mapped: OrderedDict[str, int] = OrderedDict()
        if not attaches_known:
            self.lose_track("the correlator has just started", now)

    # -- inputs ---------------------------------------------------------------------------

    def device_event(self, event: DeviceEvent, now: float) -> list[Decision]:
        """Apply a watcher event: ``added``, ``removed`` or a full ``inventory``."""
        if event.vm_id != self.vm_id:
            return []
        out: list[Decision] = []
        if event.kind == "inventory":
            if event.at < self._event_at:
                return []  # a snapshot older than what was already applied
            self._state_at = self._event_at = event.at
            listed = {d.name: d for d in event.devices}
            for name in list(self._devices):
                if name in event.unread:
                    # There but unreadable: neither gone nor known to be the same disk.
                    self._unread(self._devices[name])
                elif name not in listed:
                    out += self._remove(name, now)
            for info in event.devices:
                known = self._devices.get(info.name)
                if known is not None and not known.unread and _same_appearance(known.info, info):
                    # The watcher's own record of this very appearance (its saved state read
                    # again after a NATS reconnect): no gap in its watch, nothing to doubt.
                    known.info = _merge(known.info, info)
                    continue
                if known is not None and (
                    _same_device(known.info, info) or _resized(known.info, info)
                ):
                    self._relist(known, info)
                    continue
                if known is not None:
                    out += self._remove(info.name, now)
                self._add(info, *_appeared(info, event))
        elif event.device is not None and event.at >= self._state_at:
            self._event_at = max(self._event_at, event.at)
            info = event.device
            known = self._devices.get(info.name)
            if event.kind == "added" and event.source == "start":
                # A disk of the watcher's start scan, read only now: as if listed there.
                if known is not None and (
                    _same_device(known.info, info) or _resized(known.info, info)
                ):
                    self._relist(known, info)
                else:
                    if known is not None:
                        out += self._remove(info.name, now)
                    self._add(info, *_appeared(info, event))
            elif event.kind == "added":
                if known is not None and _same_device(known.info, info):
                    known.info = _merge(known.info, info)  # a repeat, e.g. the by-id link came
                else:
                    if known is not None:
                        out += self._remove(info.name, now)
                    self._add(info, *_appeared(info, event))
            elif event.kind == "changed":
                if known is not None and _resized(known.info, info):
                    # The same disk with a new size: it keeps its appearance (owner, claim,
                    # when it was seen), so it can never prove another attach.
                    known.info = _merge(known.info, info)
                    known.resized = True
                else:
                    # A change of a disk this engine did not know as such: present since
                    # an unknown time, never a fresh candidate.
                    if known is not None:
                        out += self._remove(info.name, now)
                    self._add(info, _UNKNOWN, _UNKNOWN)
            elif known is not None:
                out += self._remove(info.name, now)
        return out + self._evaluate(now)

    def attach(self, request: CorrelateRequest, now: float) -> list[Decision]:
        """An attach to this VM finished in CloudStack: find its device."""
        op = request.operation_id
        answered = self._answers.get(op)
        if answered is not None:
            return [answered[1]]  # a redelivery gets the same answer
        current = self._claimants.get(op)
        if current is not None and current.kind == "open":
            return []
        window = self._window(request.started_at, request.clock)
        learned = now
        if current is not None:
            window = min(window, current.window_start)
            learned = current.learned_at
        # Its own window must not open too early (a stale device would enter it): on a
        # foreign clock only this engine's first news of the attach is known to be late
        # enough.
        own = request.started_at - SKEW if self._ours(request.clock) else learned
        self._claimants[op] = _Claimant(
            operation_id=op,
            kind="open",
            window_start=window,
            size=request.size,
            volume_id=request.volume_id,
            learned_at=learned,
            request=request,
            own_start=own,
            deadline=now + self.timeout,
        )
        return self._evaluate(now)

    def release(self, request: ReleaseRequest, now: float) -> list[Decision]:
        """A volume was detached from this VM: answer when its device is gone."""
        op = request.operation_id
        answered = self._released.get(op)
        if answered is not None:
            return [answered[1]]
        if op in self._releases:
            return []
        devices, doubt = self._devices_of(request)
        if not devices:
            return [self._release_answer(request, True, "no device of the volume is present", now)]
        for d in devices:
            d.released = True
        self._releases[op] = _Release(
            request=request,
            targets={d.key: d.info.name for d in devices},
            deadline=now + self.release_timeout,
            doubt=doubt,
        )
        return []

    def operation_event(self, event: OperationEvent, now: float) -> list[Decision]:
        """Follow the executor's attaches to this VM: ``executing`` announces one (it is
        published before the attach is sent), a terminal status ends it."""
        if event.rejected_copy is not None:
            return []  # another command's rejection (it re-used the id): not this operation's
        if event.vm_id is not None and event.vm_id != self.vm_id:
            return []
        if event.type != "attach":
            if event.status in TERMINAL and event.attached is False and event.volume_id:
                self._detached(event.volume_id, now)
            return []
        op = event.operation_id
        if event.status == "executing":
            if op in self._ended or op in self._answers:
                return []
            current = self._claimants.get(op)
            window = self._window(_parse_time(event.at), event.clock)
            if current is None:
                self._claimants[op] = _Claimant(
                    operation_id=op,
                    kind="announced",
                    window_start=window,
                    size=event.size,
                    volume_id=event.volume_id,
                    learned_at=now,
                    expires=now + self.horizon,
                )
            else:
                current.window_start = min(current.window_start, window)
            return []
        if event.status in TERMINAL:
            return self._end(op, now, event.attached)
        return []

    def sync_attaches(self, in_flight: Iterable[InFlightAttach], now: float) -> list[Decision]:
        """The attaches in flight are known again (read from the attaching bucket): they
        replace the "unknown" competitors; attaches starting from now on are announced."""
        for a in in_flight:
            if a.operation_id in self._ended or a.operation_id in self._answers:
                continue
            current = self._claimants.get(a.operation_id)
            window = self._window(a.started_at, a.clock)
            if current is None:
                self._claimants[a.operation_id] = _Claimant(
                    operation_id=a.operation_id,
                    kind="announced",
                    window_start=window,
                    size=a.size,
                    volume_id=a.volume_id,
                    learned_at=now,
                    expires=now + self.horizon,
                )
            else:
                current.window_start = min(current.window_start, window)
        for op in [op for op, c in self._claimants.items() if c.kind == "unknown"]:
            del self._claimants[op]
        return self._evaluate(now)

    def lose_track(self, reason: str, now: float) -> None:
        """Attaches may have started unseen (start, reconnect): block proofs by exclusion
        until ``sync_attaches`` (or the horizon) ends the uncertainty."""
        op = f"<unknown:{now:.6f}>"
        self._claimants[op] = _Claimant(
            operation_id=op,
            kind="unknown",
            window_start=_UNKNOWN,
            size=None,
            volume_id=None,
            expires=now + self.horizon,
            reason=reason,
        )

    def tick(self, now: float) -> list[Decision]:
        """Time passed: time-outs of attaches and releases, expiry of stale knowledge."""
        out: list[Decision] = []
        for op, c in list(self._claimants.items()):
            if c.kind == "open" and c.deadline <= now:
                out.append(self._timeout(c, now))
            elif c.kind != "open" and c.expires <= now:
                out += self._expire(op, now)
        for op, r in list(self._releases.items()):
            if r.deadline <= now:
                del self._releases[op]
                names = ", ".join(sorted(r.targets.values()))
                volume, waited = r.request.volume_id, f"{self.release_timeout:g} s"
                doubt = r.doubt or next(
                    (d.doubt for d in self._devices.values() if d.key in r.targets and d.doubt),
                    "",
                )
                if not doubt:
                    msg = f"device {names} of volume {volume} is still present {waited} after "
                else:
                    msg = (
                        f"{names}, which may be volume {volume}'s device ({doubt}), still "
                        f"present {waited} after "
                    )
                msg += "the detach"
                out.append(self._release_answer(r.request, False, msg, now))
        self._forget_old(now)
        return out + self._evaluate(now)

    def prove(self, mapped: Iterable[MappedVolume]) -> list[ProvenMapping]:
        """Prove each mapped volume of this VM again against the devices present now: the
        one device with its serial, else the device without serial that this engine proved
        for that very attach, still the same appearance. Anything else names no device, with
        the reason: after a reboot the kernel may have given the old name to another disk."""
        return [self._prove(m) for m in mapped]

    def _prove(self, m: MappedVolume) -> ProvenMapping:
        serial = serial_of(m.volume_id)
        was = f" (it was {m.device_path})" if m.device_path else ""

        def none(reason: str) -> ProvenMapping:
            return ProvenMapping(
                volume_id=m.volume_id, operation_id=m.operation_id, proof="none", reason=reason
            )

        def on(d: _Device, proof: Literal["serial", "exclusive"]) -> ProvenMapping:
            identity, reason = _how_proven(d.info, proof)
            return ProvenMapping(
                volume_id=m.volume_id,
                operation_id=m.operation_id,
                proof=proof,
                device_path=d.info.path,
                by_id_path=d.info.by_id_path,
                reason=reason,
                identity=identity,
            )

        same = [d for d in self._devices.values() if d.info.serial == serial]
        unread = [d.info.name for d in same if d.unread]
        if unread:
            return none(
                f"{unread[0]}, which had serial {serial}, could not be read after the watcher "
                f"was away: it may be another disk now{was}"
            )
        live = [d for d in same if not d.released]
        if len(live) == 1:
            return on(live[0], "serial")
        if live:
            names = ", ".join(sorted(d.info.name for d in live))
            return none(f"devices {names} all carry serial {serial}{was}")
        if same:
            return none(f"the volume was detached: its device {same[0].info.name} is going{was}")
        key = self._mapped.get(m.volume_id)
        mine = next((d for d in self._devices.values() if d.key == key), None)
        if (
            mine is not None
            and m.operation_id is not None
            and mine.claimed_by == m.operation_id
            and not mine.released
        ):
            if mine.doubt is None:
                return on(mine, "exclusive")
            return none(
                f"no device with serial {serial} is present, and the device proven to be "
                f"this volume's may be another disk now: {mine.doubt}{was}"
            )
        missing = f"no device with serial {serial} is present"
        if key is not None and mine is None:
            return none(f"{missing}, and the device proven to be this volume's is gone{was}")
        if self.serial_host:
            return none(f"{missing}{was}")
        return none(
            f"{missing}, and no device without serial was proven to be this volume's by this "
            f"correlator since it started (a restart or a reboot may have given its name to "
            f"another disk){was}"
        )

    # -- state the actor reads ------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do next, or None."""
        times = [c.deadline if c.kind == "open" else c.expires for c in self._claimants.values()]
        times += [r.deadline for r in self._releases.values()]
        return min(times) if times else None

    @property
    def waiting(self) -> int:
        """Attach and release requests not answered yet."""
        return sum(c.kind == "open" for c in self._claimants.values()) + len(self._releases)

    @property
    def attaches_waiting(self) -> int:
        """Attaches CloudStack completed that wait for their device."""
        return sum(c.kind == "open" for c in self._claimants.values())

    @property
    def attaches_known(self) -> bool:
        return not any(c.kind == "unknown" for c in self._claimants.values())

    def devices(self) -> list[DeviceInfo]:
        return [d.info for d in self._devices.values()]

    def mapping(self, volume_id: str) -> DeviceInfo | None:
        """The present device this engine answered for ``volume_id``, if any."""
        for d in self._devices.values():
            if d.volume_id == volume_id:
                return d.info
        return None

    # -- decisions ------------------------------------------------------------------------

    def _evaluate(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        progress = True
        while progress:
            progress = False
            waiting = sorted(
                (c for c in self._claimants.values() if c.kind == "open"),
                key=lambda c: (c.own_start, c.operation_id),
            )
            for c in waiting:
                decision = self._decide(c, now)
                if decision is not None:
                    out.append(decision)
                    progress = True
                    break  # the state changed: look at every request again
        return out

    def _decide(self, c: _Claimant, now: float) -> CorrelateResult | None:
        assert c.request is not None
        req = c.request
        if req.serial:
            # An appearance whose volume was detached since is an old one still on its way
            # out (or a stale view): a re-attach of the volume gets a new appearance.
            same = [
                d
                for d in self._devices.values()
                if d.info.serial == req.serial and not d.released and not d.unread
            ]
            if len(same) == 1:
                self.serial_host = True
                return self._success(c, same[0], "serial", now)
            if len(same) > 1:
                names = ", ".join(sorted(d.info.name for d in same))
                return self._fail(
                    c,
                    "ambiguous_device",
                    f"devices {names} all carry serial {req.serial} of volume {req.volume_id}",
                    now,
                )
        if self.serial_host:
            return None
        candidates = [d for d in self._devices.values() if self._candidate(c, d)]
        if len(candidates) > 1:
            names = ", ".join(sorted(d.info.name for d in candidates))
            return self._fail(
                c,
                "ambiguous_device",
                f"cannot tell which device is volume {req.volume_id}: {names} have no serial, "
                f"are all {_size(req.size)} and all appeared after {self._since(req)}",
                now,
            )
        if not candidates:
            return None
        device = candidates[0]
        if device.seen_after < self.watch_since:
            return self._fail(
                c,
                "ambiguous_device",
                f"device {device.info.name} (no serial, {_size(device.info.size)}) fits volume "
                f"{req.volume_id}, but it appeared before the correlator started, which may "
                f"have mapped it to another volume already",
                now,
            )
        if device.taint:
            return self._fail(
                c,
                "ambiguous_device",
                f"device {device.info.name} (no serial, {_size(device.info.size)}) fits volume "
                f"{req.volume_id}, but may also belong to {device.taint}",
                now,
            )
        rivals = [r for r in self._claimants.values() if r is not c and self._fits(r, device)]
        if not rivals:
            return self._success(c, device, "exclusive", now)
        waiting = [r for r in rivals if r.kind == "open"]
        if waiting:
            return self._fail(
                c,
                "ambiguous_device",
                f"device {device.info.name} (no serial, {_size(device.info.size)}) appeared "
                f"while {_describe(waiting)} of the same size were also waiting for their "
                f"device: it could be either volume's",
                now,
            )
        return None  # rivals still in flight: wait until their sizes are known or they end

    def _timeout(self, c: _Claimant, now: float) -> CorrelateResult:
        assert c.request is not None
        req = c.request
        waited = f"{self.timeout:g} s"
        device = None
        if not self.serial_host:
            candidates = [d for d in self._devices.values() if self._candidate(c, d)]
            device = candidates[0] if len(candidates) == 1 else None
        if device is not None:
            rivals = [r for r in self._claimants.values() if r is not c and self._fits(r, device)]
            return self._fail(
                c,
                "ambiguous_device",
                f"device {device.info.name} (no serial, {_size(device.info.size)}) fits volume "
                f"{req.volume_id}, but during {waited} it could not be told apart from "
                f"{_describe(rivals)}",
                now,
            )
        what = f"no device with serial {req.serial} appeared within {waited}"
        if self.serial_host:
            what += " (this host gives volumes serials, so no device without one is taken)"
        else:
            what += (
                f", nor a device without serial of exactly {_size(req.size)} that appeared "
                f"after {self._since(req)}"
            )
        return self._fail(c, "device_timeout", what, now)

    def _success(self, c: _Claimant, d: _Device, proof: str, now: float) -> CorrelateResult:
        assert c.request is not None
        req = c.request
        d.claimed_by = req.operation_id
        d.volume_id = req.volume_id
        self._mapped[req.volume_id] = d.key
        self._mapped.move_to_end(req.volume_id)
        while len(self._mapped) > _CACHE_MAX:
            self._mapped.popitem(last=False)
        del self._claimants[req.operation_id]
        result = CorrelateResult(
            operation_id=req.operation_id,
            volume_id=req.volume_id,
            device_path=d.info.path,
            by_id_path=d.info.by_id_path,
            size=d.info.size,
            proof=proof,
        )
        self._remember(self._answers, req.operation_id, result, now)
        return result

    def _fail(self, c: _Claimant, code: ErrorCode, message: str, now: float) -> CorrelateResult:
        """Answer with an error; the attach stays a competitor until it is rolled back
        (its terminal event), and the devices it could own are tainted."""
        assert c.request is not None
        req = c.request
        c.kind = "failed"
        c.expires = now + self.horizon
        self._taint(c, self._why(c))
        result = CorrelateResult(
            operation_id=req.operation_id,
            volume_id=req.volume_id,
            error=ErrorInfo(code=code, message=message),
        )
        self._remember(self._answers, req.operation_id, result, now)
        return result

    def _end(self, op: str, now: float, attached: bool | None = None) -> list[Decision]:
        """An attach's terminal event came: if it got no device, the devices it could own
        are tainted, and so are new ones: for ``linger`` seconds more if its volume is not
        attached (the watcher may report a device that came and went during the roll-back
        only after the failed event); as long as it stays attached (its roll-back failed,
        or the attachment was not this attach's to undo) if it is: its device may appear at
        any time, and only the volume's detach (``_detached``) ends that doubt."""
        self._ended[op] = now
        c = self._claimants.get(op)
        if c is None or c.kind in ("open", "unknown"):
            return []
        if c.kind == "announced":
            c.kind = "failed"  # it ended without asking for its device
        c.expires = _NEVER if attached else min(c.expires, now + self.linger)
        self._taint(c, self._why(c))
        return self._evaluate(now)

    def _detached(self, volume_id: str, now: float) -> None:
        """The volume was detached (a terminal detach or delete event saying so): a failed
        attach of it that left it attached taints new devices for ``linger`` seconds more
        only (its device, if it came, goes now)."""
        for c in self._claimants.values():
            if c.kind == "failed" and c.volume_id == volume_id and c.expires == _NEVER:
                c.expires = now + self.linger

    def _expire(self, op: str, now: float) -> list[Decision]:
        """Forget an attach that is over (linger passed) or never reported its end."""
        c = self._claimants.pop(op)
        self._ended.setdefault(op, now)
        self._taint(c, self._why(c))
        return self._evaluate(now)

    def _since(self, req: CorrelateRequest) -> str:
        """What the request's own window opens with, for messages."""
        if self._ours(req.clock):
            return "the attach was sent"
        return "this correlator learned of the attach (its executor's clock is another host's)"

    @staticmethod
    def _why(c: _Claimant) -> str:
        if c.kind == "unknown":
            return f"an attach the correlator may have missed ({c.reason})"
        return f"attach {c.operation_id} of volume {c.volume_id}, which got no device"

    # -- rules ----------------------------------------------------------------------------

    def _ours(self, clock: str | None) -> bool:
        """Are times stamped on ``clock`` comparable with this engine's (the watcher's)?"""
        return clock == self.clock

    def _window(self, at: float, clock: str | None) -> float:
        """Where a competitor's window opens, from a time its executor stamped: on another
        host's clock the time tells nothing here, so the window is open since always."""
        return at - SKEW if self._ours(clock) else _UNKNOWN

    def _candidate(self, c: _Claimant, d: _Device) -> bool:
        """A device R could be proven to own: no serial, unclaimed, not a detached volume's,
        neither resized nor doubted, in R's own window, same size (a tainted one counts: it
        makes R ambiguous rather than go unnoticed)."""
        assert c.request is not None
        return (
            not d.info.serial
            and d.claimed_by is None
            and not d.released
            and not d.resized
            and d.doubt is None
            and d.seen_at >= c.own_start
            and d.info.size == c.request.size
        )

    def _fits(self, r: _Claimant, d: _Device) -> bool:
        """Could attach ``r`` own device ``d``? (Conservative: unknowns fit.)"""
        if d.info.serial or d.claimed_by is not None or d.seen_at < r.window_start:
            return False
        if r.size is not None and r.size != d.info.size:
            return False
        # An attach whose own device is already identified by serial owns no other.
        return not (r.volume_id and self._has_serial(serial_of(r.volume_id)))

    def _has_serial(self, serial: str) -> bool:
        return any(d.info.serial == serial and not d.unread for d in self._devices.values())

    def _taint(self, c: _Claimant, why: str) -> None:
        for d in self._devices.values():
            if self._fits(c, d):
                d.taint = d.taint or why
                if c.volume_id:
                    d.suspects.add(c.volume_id)

    # -- devices --------------------------------------------------------------------------

    def _add(self, info: DeviceInfo, seen_after: float, seen_at: float) -> None:
        self._next_key += 1
        d = _Device(key=self._next_key, info=info, seen_at=seen_at, seen_after=seen_after)
        self._devices[info.name] = d
        for c in self._claimants.values():
            if c.kind == "failed" and self._fits(c, d):
                d.taint = d.taint or self._why(c)
                if c.volume_id:
                    d.suspects.add(c.volume_id)

    def _remove(self, name: str, now: float) -> list[Decision]:
        d = self._devices.pop(name, None)
        if d is None:
            return []
        out: list[Decision] = []
        for op, r in list(self._releases.items()):
            if r.targets.pop(d.key, None) is not None and not r.targets:
                del self._releases[op]
                out.append(self._release_answer(r.request, True, f"device {name} is gone", now))
        return out

    def _relist(self, d: _Device, info: DeviceInfo) -> None:
        """An inventory lists the appearance again (same name, serial and controller, or
        same serial and size), maybe resized: it keeps its owner, claim, first-seen time and
        release targets. Without serial, after the gap, it may be another disk under its
        name, so it is doubted (see "Inventories")."""
        if not info.serial and d.doubt is None:
            same = info.size == d.info.size
            listed = "again" if same else f"at {_size(info.size)} instead of {_size(d.info.size)}"
            d.doubt = (
                f"{info.name} has no serial and was listed {listed} after the watcher was "
                f"away: the same disk{'' if same else ' resized'}, or another one under its name"
            )
        if info.size != d.info.size:
            d.resized = True
        d.info = _merge(d.info, info)
        d.unread = False

    def _unread(self, d: _Device) -> None:
        """A start scan after a gap lists the appearance's name as there but unreadable: it
        stays (its release waits for it), without serial doubted, with one not trusted by
        its serial until it is read again (``_relist``, or a remove and an add)."""
        d.unread = True
        if not d.info.serial and d.doubt is None:
            d.doubt = (
                f"{d.info.name} has no serial and could not be read after the watcher was "
                f"away: the same disk, or another one under its name"
            )

    def _devices_of(self, request: ReleaseRequest) -> tuple[list[_Device], str]:
        """The volume's present device: the appearance we mapped, one with its serial, or
        (only for a volume this engine never mapped, e.g. after a restart) the given path
        when that device has no serial and no other owner. For a volume whose attach failed
        without serial (a roll-back): every device that could have been its one. With them,
        why they may only be its device ("" when they are its own)."""
        key = self._mapped.get(request.volume_id)
        mapped = next((d for d in self._devices.values() if d.key == key), None)
        if mapped is not None:
            return [mapped], mapped.doubt or ""
        serial = serial_of(request.volume_id)
        for d in self._devices.values():
            if d.info.serial == serial and not d.released:
                return [d], ""
        if key is not None:
            return [], ""  # the appearance we mapped is gone; its letter may be reused
        suspects = [d for d in self._devices.values() if request.volume_id in d.suspects]
        if suspects:
            return suspects, "its attach failed without proof of which device it got"
        if request.device_path:
            for d in self._devices.values():
                if (
                    d.info.path == request.device_path
                    and d.volume_id in (None, request.volume_id)
                    and not d.info.serial
                ):
                    return [d], ""
        return [], ""

    # -- bookkeeping ----------------------------------------------------------------------

    def _release_answer(
        self, request: ReleaseRequest, gone: bool, message: str, now: float
    ) -> ReleaseResult:
        result = ReleaseResult(
            operation_id=request.operation_id,
            volume_id=request.volume_id,
            gone=gone,
            message=message,
        )
        self._remember(self._released, request.operation_id, result, now)
        return result

    def _remember(
        self, cache: OrderedDict[str, tuple[float, _R]], op: str, result: _R, now: float
    ) -> None:
        cache[op] = (now, result)
        while len(cache) > _CACHE_MAX:
            cache.popitem(last=False)

    def _forget_old(self, now: float) -> None:
        """Answers are kept for redeliveries, ended operations against late events: both
        only within the horizon."""
        limit = now - self.horizon
        for cache in (self._answers, self._released):
            while cache and next(iter(cache.values()))[0] < limit:
                cache.popitem(last=False)
        while self._ended and next(iter(self._ended.values())) < limit:
            self._ended.popitem(last=False)
        while len(self._ended) > _CACHE_MAX:
            self._ended.popitem(last=False)


def _how_proven(info: DeviceInfo, proof: Literal["serial", "exclusive"]) -> tuple[str, str]:
    """Which identity of the device proved a mapping, and that in a sentence (the bus only
    changes where the serial was read: the match is the same on every bus)."""
    if proof == "serial":
        identity = identity_of(info)
        return identity, f"{info.name} carries the volume's serial {info.serial} ({identity})"
    return "exclusion", (
        f"{info.name} has no serial; this correlator proved it by exclusion when the volume "
        f"was attached, and it is the same appearance"
    )


def _same_device(a: DeviceInfo, b: DeviceInfo) -> bool:
    """Same appearance, as far as can be told (a watcher restart re-stamps appeared_at);
    without serial, after a gap, that is no proof (see "Inventories")."""
    return a.serial == b.serial and a.size == b.size


def _resized(a: DeviceInfo, b: DeviceInfo) -> bool:
    """The same disk with another size, as the watcher tells a resize (``changed``): same
    name, serial and controller."""
    return a.name == b.name and a.serial == b.serial and a.controller == b.controller


def _same_appearance(a: DeviceInfo, b: DeviceInfo) -> bool:
    """Whether ``b`` is the watcher's record of appearance ``a`` itself: the same disk with
    the same appearance times. The watcher stamps each appearance once (a restarted one
    stamps what it lists with its own start), so equal times mean it watched without a gap
    in between (a saved state read again after a NATS reconnect, an inventory published
    again): not "listed again after a gap"."""
    return (
        a.appeared_at > 0
        and a.appeared_at == b.appeared_at
        and a.appeared_after == b.appeared_after
        and a.name == b.name
        and a.serial == b.serial
        and a.size == b.size
        and a.controller == b.controller
    )


def _merge(old: DeviceInfo, new: DeviceInfo) -> DeviceInfo:
    """Newer details (by-id link, controller); the appearance keeps its first times."""
    first = old if old.appeared_at > 0 else new
    # replace, not a new DeviceInfo: every other field (bus, serial_source...) is the newer.
    return replace(
        new,
        by_id_path=new.by_id_path or old.by_id_path,
        controller=new.controller or old.controller,
        appeared_at=first.appeared_at,
        appeared_after=first.appeared_after,
    )


def _appeared(info: DeviceInfo, event: DeviceEvent) -> tuple[float, float]:
    """When a reported device appeared: (at the earliest, at the latest), from the
    watcher's stamps. "Before the watcher started" (``appeared_after`` 0.0, or any entry of
    a start scan from a watcher that does not say) is before any attach it could have seen:
    -inf for both. A watcher older than ``appeared_after`` stamped one time: both bounds."""
    if info.appeared_after == 0.0 or (info.appeared_after is None and event.source == "start"):
        return _UNKNOWN, _UNKNOWN
    latest = info.appeared_at if info.appeared_at > 0 else event.at
    earliest = latest if info.appeared_after is None else min(info.appeared_after, latest)
    return earliest, latest


def _parse_time(value: str | None) -> float:
    at = epoch_of(value)
    return _UNKNOWN if at is None else at


def _size(size: int) -> str:
    return f"{size / GIB:g} GiB" if size % GIB == 0 else f"{size} bytes"


def _describe(claimants: list[_Claimant]) -> str:
    parts = []
    for c in claimants:
        if c.kind == "unknown":
            parts.append(f"attaches that may have started unseen ({c.reason})")
        elif c.kind == "announced":
            size = "size not known yet" if c.size is None else _size(c.size)
            parts.append(f"attach {c.operation_id} of volume {c.volume_id} ({size}) in flight")
        elif c.kind == "failed":
            parts.append(f"failed attach {c.operation_id} of volume {c.volume_id}")
        else:
            parts.append(f"attach {c.operation_id} of volume {c.volume_id}")
    return "; ".join(parts) if parts else "another attach"
