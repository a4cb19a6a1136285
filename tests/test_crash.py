"""Crash-safety under fault injection, with real processes and real servers.

`volumed run` (all four actors) runs as a child process against a real nats-server, a private
MariaDB (its own data directory and port, see tests/mariadb.py) and the CloudStack simulator
(job latency, injected faults, hot-plug into a fake sysfs/dev tree). A workload of volume
lifecycles — create, attach to a remote VM, detach, attach to the local VM, detach, delete,
with cancels and deliberate duplicate sends — runs while a chaos schedule kills `volumed` with
SIGKILL at random moments (half of them while commands are in flight, half at the instant a
mutation reaches CloudStack) and restarts it, restarts the nats-server (same port and store)
and takes MariaDB away (SIGKILL, restarted after the outage). Afterwards:

- every operation has exactly one terminal state: in the VOLUMED_EVENTS stream exactly one
  terminal event (copies re-published with the same Nats-Msg-Id are dropped by JetStream;
  an operation the user sent twice may have its latest event re-published, all copies equal),
  and a row in volume_operations with that status — no row lost, none extra;
- the simulator's CloudStack saw no mutation twice: per volume, the changes it applied equal
  the ones the operations' outcomes account for, and no mutation was refused as a repeat
  (already attached, not attached, no such volume);
- the simulator's volumes are exactly the completed creates minus the completed deletes;
- every completed local attach named the device the simulator hot-plugged for that volume,
  in its event and its row, and device_mappings matches what is attached at the end;
- nothing is left for redelivery: the durable consumers have no backlog, no dead letters.

Two hosts and two clocks (issue 13): beside `volumed` (host A: all four actors, its VM's fake
trees) runs host B, its wall clock 40 s ahead (hours ahead or behind in FULL; Debian's
faketime): `volumed run executor`, so that executors on two clocks run the same volumes'
operations, and `volumed run watcher correlator` for a second VM with its own trees and host
id. Host B's watcher runs in a mount namespace of its own with its /dev bound where host A's
is, as on two real hosts: both name their first data disk `/dev/.../vdb` (device paths are
unique per VM, not across VMs). Lifecycles attach to either host's VM; every completed attach
must name its own host's device for that volume, and device_mappings must be right for both.
Each of the three processes reaches NATS through its own TCP proxy (tests/tcp_proxy.py), and
the chaos cuts one of them for 3-6 s (the three in turn) at an attach it takes part in: just
as its device appears, or as it reaches CloudStack. No attach may be detached again
(`attaches_rolled_back`), every one names its own host's device.

Small by default (CI, about a minute); ``VOLUMED_CRASH_FULL=1`` runs the full size (at least
200 operations, 12 kills, two NATS restarts, MariaDB away for 35 s, 9 connection cuts;
about three minutes).
``VOLUMED_CRASH_SEED`` repeats a schedule. The counts are printed as `name: value` lines
(pytest -s) and asserted; calls.jsonl, chaos.log and volumed.log stay in the test's tmp dir.
Without mariadbd the database outage is skipped (SQLite), saying so.

The smaller tests before it pin down, each alone, the bugs the chaos found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bus import Bus
from schemas.common import GIB, serial_of
from simulator import Fault, GuestConfig, SimConfig, Simulator, VMConfig
from simulator.faults import JOB_ERRORTEXT
from simulator.hotplug import make_guest_tree
from tests.conftest import (
    Database,
    NatsServer,
    VolumedProcess,
    skewed_clock,
    start_volumed,
    stop_volumed,
    volumed_env,
)
from tests.mariadb import PrivateMariaDB, mariadb_binaries
from tests.tcp_proxy import TcpProxy
from tests.test_devices_e2e import fake_tree
from tests.test_lifecycle import create_body, create_volume, remote_vm, settings_for
from tests.test_lifecycle import op as new_op_id

TERMINAL = ("completed", "failed", "cancelled", "rejected")
MUTATIONS = ("createVolume", "attachVolume", "detachVolume", "deleteVolume")
# What CloudStack answers to a mutation that repeats one already applied.
REPEAT_REFUSALS = ("not attached to any vm", "not attached to a vm", "does not exist")
ROLLED_BACK = "the volume was detached again"


@dataclass(frozen=True)
class Size:
    operations: int  # at least this many accepted operations
    kills: int  # kill -9 of volumed, each followed by a restart
    nats_restarts: int
    db_outage: float  # seconds MariaDB is away (once)
    span: float  # seconds over which the chaos happens (the workload runs through it)
    chains: int  # volume lifecycles in flight at once
    think: float  # mean seconds a user waits between the steps of a lifecycle
    cuts: int  # connection cuts of one process (taking the three in turn)
    skews: tuple[str, ...]  # host B's clock offset (faketime), one picked


SMALL = Size(
    operations=60,
    kills=4,
    nats_restarts=1,
    db_outage=10.0,
    span=40.0,
    chains=4,
    think=1.5,
    cuts=3,
    skews=("+40s",),
)
FULL = Size(
    operations=200,
    kills=12,
    nats_restarts=2,
    db_outage=35.0,
    span=150.0,
    chains=6,
    think=1.5,
    cuts=9,
    skews=("+3h", "-3h"),
)
CUT_SECONDS = (3.0, 6.0)


@dataclass
class Host:
    """A simulated host serving one VM: its fake trees as the simulator writes them, and its
    /dev as its volumed sees it (where the device paths in events and rows point)."""

    name: str
    vm_id: str
    sysfs: Path
    dev: Path
    seen_dev: Path


@dataclass
class HostProcess(VolumedProcess):
    """`volumed run ACTORS`, with ``bind`` (real dir, where): in a mount namespace of its
    own in which the real dir is bound over ``where``, as another machine's /dev would be."""

    bind: tuple[Path, Path] | None = None

    async def start(self, *, signals_blocked: bool = False) -> None:
        if self.bind is None:
            await super().start(signals_blocked=signals_blocked)
            return
        real, where = self.bind
        # unshare and sh exec: the pid is python's, so kill -9 and SIGTERM reach volumed.
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        command = [sys.executable, "-m", "actors.cli", "run", *self.actors]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(real),
            str(where),
            *command,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
            cwd=str(Path(__file__).resolve().parent.parent),
        )


def can_bind_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


# -- the user's side ----------------------------------------------------------------------


@dataclass
class Op:
    id: str
    type: str
    body: dict[str, Any]
    chain: int
    volume_id: str | None = None
    sends: int = 0  # publishes that may have reached the stream
    resent: bool = False  # sent more than once (deliberately, or a publish retried)
    terminal: dict[str, Any] | None = None
    expected_device: str | None = None  # completed attach to a host's VM: its device


class User:
    """Publishes commands (retrying through NATS outages) and waits for terminal events: from
    its core subscription, and from the stream when a core message was missed (reconnects)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def start(self) -> None:
        async def on_event(_subject: str, data: bytes, _reply: str | None) -> None:
            with contextlib.suppress(ValueError):
                event = json.loads(data)
                waiter = self._waiters.get(str(event.get("operation_id")))
                if event.get("status") in TERMINAL and waiter is not None and not waiter.done():
                    waiter.set_result(event)

        await self.bus.subscribe("volume.events.>", on_event)

    def expect(self, op: Op) -> None:
        """Listen for ``op``'s terminal event from now on (before it is sent)."""
        self._waiters.setdefault(op.id, asyncio.get_running_loop().create_future())

    async def send(self, op: Op) -> None:
        self.expect(op)
        data = json.dumps(op.body).encode()
        deadline = time.monotonic() + 180
        while True:
            op.sends += 1
            if op.sends > 1:
                op.resent = True
            try:
                await self.bus.js.publish(f"volume.cmd.{op.type}", data, timeout=3)
                return
            except Exception:
                # Maybe stored and only the acknowledgement lost: the retry is a re-send.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def terminal(self, op: Op, timeout: float) -> dict[str, Any] | None:
        waiter = self._waiters.setdefault(op.id, asyncio.get_running_loop().create_future())
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(waiter), 2.0)
                with contextlib.suppress(Exception):
                    msg = await self.bus.js.get_last_msg("VOLUMED_EVENTS", f"volume.events.{op.id}")
                    event = json.loads(msg.data or b"{}")
                    if event.get("status") in TERMINAL:
                        return dict(event)
            return None
        finally:
            self._waiters.pop(op.id, None)


# -- what CloudStack holds ----------------------------------------------------------------


@dataclass(frozen=True)
class VolState:
    exists: bool
    vm_id: str | None


def state_of(sim: Simulator, volume_id: str) -> VolState:
    volume = sim.world.volumes.get(volume_id)
    return VolState(volume is not None, volume.vm_id if volume is not None else None)


def transitions(before: VolState, after: VolState) -> int:
    """CloudStack changes it takes at least to get from ``before`` to ``after``."""
    if before.exists and not after.exists:
        return 1 + (1 if before.vm_id else 0)  # a delete, after a detach if attached
    n = 1 if after.exists and not before.exists else 0
    if before.vm_id != after.vm_id:
        n += (1 if before.vm_id else 0) + (1 if after.vm_id else 0)
    return n


# -- the workload -------------------------------------------------------------------------


class Workload:
    def __init__(
        self, user: User, sim: Simulator, hosts: list[Host], size: Size, rng: random.Random
    ) -> None:
        self.user = user
        self.sim = sim
        self.hosts = {h.vm_id: h for h in hosts}
        self.size = size
        self.rng = rng
        self.ops: dict[str, Op] = {}
        self.created: set[str] = set()  # volumes of completed creates
        self.deleted: set[str] = set()  # volumes of completed deletes
        self.expected: Counter[str] = Counter()  # CloudStack changes each volume should have
        self.untracked: set[str] = set()  # volumes whose bookkeeping was cut short
        self.problems: list[str] = []
        self.deliberate_dups = 0
        self.half_done: list[str] = []
        self.local_attaches = 0
        self.host_attaches: Counter[str] = Counter()  # completed attaches per host
        self.rolled_back: list[str] = []  # attaches that failed and detached the volume again
        self.mapping_errors = 0
        self.in_flight: set[str] = set()  # sent, terminal event not seen yet
        self._seq = 0
        self.remote_vms = [v for v in sim.vm_ids if v not in self.hosts]
        self.op_timeout = 300.0

    def new(self, op_type: str, body: dict[str, Any], chain: int) -> Op:
        self._seq += 1
        op_id = f"k{chain}-{self._seq}-{op_type}-{uuid.uuid4().hex[:8]}"
        op = Op(op_id, op_type, {"operation_id": op_id, **body}, chain, body.get("volume_id"))
        self.ops[op_id] = op
        return op

    async def think(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 2 * self.size.think))

    async def send(self, op: Op) -> None:
        self.in_flight.add(op.id)
        await self.user.send(op)
        if self.rng.random() < 0.12:
            # A user sending the same command twice, at once or a little later.
            self.deliberate_dups += 1
            op.resent = True
            await asyncio.sleep(self.rng.choice([0.0, 0.05, 0.3, 1.0]))
            await self.user.send(op)

    async def wait(self, op: Op) -> dict[str, Any] | None:
        event = await self.user.terminal(op, self.op_timeout)
        self.in_flight.discard(op.id)
        if event is None:
            self.problems.append(f"{op.id}: no terminal event within {self.op_timeout:.0f} s")
            if op.volume_id:
                self.untracked.add(op.volume_id)
        op.terminal = event
        if event is not None and op.resent and self.rng.random() < 0.3:
            # A late duplicate of a finished operation: only its latest event comes again.
            self.deliberate_dups += 1
            await self.user.send(op)
        return event

    # A step: one command, its outcome checked against what CloudStack shows.
    async def step(self, op_type: str, body: dict[str, Any], chain: int) -> dict[str, Any] | None:
        volume_id = str(body["volume_id"])
        before = state_of(self.sim, volume_id)
        op = self.new(op_type, body, chain)
        await self.send(op)
        event = await self.wait(op)
        if event is None:
            return None
        after = state_of(self.sim, volume_id)
        status = event["status"]
        message = str((event.get("error") or {}).get("message", ""))
        hidden = 2 if op_type == "attach" and ROLLED_BACK in message else 0
        if hidden:
            self.rolled_back.append(f"{op.id} to {body['vm_id']}: {message}")
        self.expected[volume_id] += transitions(before, after) + hidden
        # A delete detaches first; when the delete itself then fails, the volume stays
        # detached, as documented: that is not half done.
        detached_only = op_type == "delete" and after == VolState(True, None)
        if status == "completed":
            self.check_claim(op, event, after)
        elif after != before and not detached_only:
            self.half_done.append(f"{op.id} {status} ({message}) yet {before} -> {after}")
        return event

    def check_claim(self, op: Op, event: dict[str, Any], after: VolState) -> None:
        volume_id = str(op.volume_id)
        if op.type == "attach":
            vm = op.body["vm_id"]
            if after.vm_id != vm:
                self.problems.append(f"{op.id}: attach completed but {volume_id} is on {after}")
            host = self.hosts.get(vm)
            if host is not None:
                self.local_attaches += 1
                self.host_attaches[host.name] += 1
                name = self.sim.devices_of(vm).get(volume_id)
                want = str(host.seen_dev / name) if name else None
                op.expected_device = want
                by_id = str(host.seen_dev / "disk" / "by-id" / f"virtio-{serial_of(volume_id)}")
                if want is None or event.get("device_path") != want:
                    self.mapping_errors += 1
                    self.problems.append(
                        f"{op.id}: device_path {event.get('device_path')} but the simulator "
                        f"plugged {want} into {host.name}"
                    )
                if event.get("by_id_path") != by_id:
                    self.mapping_errors += 1
                    self.problems.append(f"{op.id}: by_id_path {event.get('by_id_path')}")
            elif event.get("device_path") is not None:
                self.mapping_errors += 1
                self.problems.append(f"{op.id}: remote attach with a device_path")
        elif op.type == "detach" and after.vm_id is not None:
            self.problems.append(f"{op.id}: detach completed but {volume_id} is on {after}")
        elif op.type == "delete":
            if after.exists:
                self.problems.append(f"{op.id}: delete completed but {volume_id} exists")
            self.deleted.add(volume_id)

    # The lifecycles.
    async def create(self, chain: int) -> str | None:
        for attempt in range(4):
            name = f"crash-{chain}-{attempt}-{uuid.uuid4().hex[:6]}"
            body = {
                "name": name,
                "size": self.rng.choice([1, 2, 3]) * GIB,
                "disk_offering_id": self.sim.disk_offering_ids[0],
                "zone_id": self.sim.zone_id,
            }
            op = self.new("create", body, chain)
            await self.send(op)
            event = await self.wait(op)
            if event is None:
                return None
            if event["status"] == "completed":
                volume_id = str(event["volume_id"])
                op.volume_id = volume_id
                self.created.add(volume_id)
                self.expected[volume_id] += 1
                if not state_of(self.sim, volume_id).exists:
                    self.problems.append(f"{op.id}: create completed, {volume_id} does not exist")
                return volume_id
            await self.think()
        return None

    async def reach(self, chain: int, volume_id: str, vm_id: str | None) -> bool:
        """Attach to ``vm_id`` (or detach when None), retrying failures a few times."""
        for _ in range(4):
            current = state_of(self.sim, volume_id)
            if current.vm_id == vm_id:
                return True
            if current.vm_id is not None and vm_id is not None:
                return False
            if vm_id is None:
                event = await self.step("detach", {"volume_id": volume_id}, chain)
            else:
                event = await self.step("attach", {"volume_id": volume_id, "vm_id": vm_id}, chain)
            if event is None:
                return False
            await self.think()
        return state_of(self.sim, volume_id).vm_id == vm_id

    async def attach_then_cancel_detach(self, chain: int, volume_id: str, vm_id: str) -> bool:
        """Attach, a detach queued behind it on the same volume, and a cancel of that detach,
        sent back to back: the cancel wins while the detach waits its turn, or is refused."""
        before = state_of(self.sim, volume_id)
        attach = self.new("attach", {"volume_id": volume_id, "vm_id": vm_id}, chain)
        detach = self.new("detach", {"volume_id": volume_id}, chain)
        cancel = self.new("cancel", {"target": detach.id}, chain)
        for op in (attach, detach, cancel):
            await self.send(op)
        events = [await self.wait(op) for op in (attach, detach, cancel)]
        if any(e is None for e in events):
            self.untracked.add(volume_id)
            return False
        a, d, c = (str(e["status"]) for e in events if e is not None)
        after = state_of(self.sim, volume_id)
        hidden = 2 if a == "completed" and d == "completed" else 0
        message = str(((events[0] or {}).get("error") or {}).get("message", ""))
        if ROLLED_BACK in message:
            hidden += 2
            self.rolled_back.append(f"{attach.id} to {vm_id}: {message}")
        self.expected[volume_id] += transitions(before, after) + hidden
        if (d == "cancelled") != (c == "completed"):
            self.problems.append(f"{cancel.id} {c} but its target {detach.id} is {d}")
        if d == "completed":
            if after.vm_id is not None:
                self.problems.append(f"{detach.id}: detach completed, volume on {after.vm_id}")
        elif a == "completed":
            self.check_claim(attach, events[0] or {}, after)
        elif after != before:
            self.half_done.append(f"{attach.id} {a}, {detach.id} {d}, yet {before} -> {after}")
        return True

    async def lifecycle(self, chain: int) -> None:
        volume_id = await self.create(chain)
        if volume_id is None:
            return
        ending = chain % 6  # 0: stays on the local VM, 1: stays on a remote VM, 2: deleted
        # while attached (delete detaches first), else: detached, then deleted
        remote = self.rng.choice(self.remote_vms)
        served = self.rng.choice(sorted(self.hosts))  # the VM of a host (A or B)
        await self.think()
        if self.rng.random() < 0.35:
            await self.attach_then_cancel_detach(chain, volume_id, remote)
            await self.think()
        if not await self.reach(chain, volume_id, remote) or ending == 1:
            return
        await self.think()
        if not await self.reach(chain, volume_id, None):
            return
        await self.think()
        if not await self.reach(chain, volume_id, served) or ending == 0:
            return
        await self.think()
        if ending != 2 and not await self.reach(chain, volume_id, None):
            return
        await self.think()
        for _ in range(4):
            event = await self.step("delete", {"volume_id": volume_id}, chain)
            if event is None or event["status"] == "completed":
                return
            await self.think()

    async def run(self, keep_going: Callable[[], bool]) -> None:
        chains = iter(range(1, 1_000_000))

        async def worker() -> None:
            while keep_going() or len(self.ops) < self.size.operations:
                await self.lifecycle(next(chains))

        await asyncio.gather(*(worker() for _ in range(self.size.chains)))


# -- the chaos ----------------------------------------------------------------------------


@dataclass
class Chaos:
    workload: Workload
    volumed: VolumedProcess
    nats: NatsServer
    db: PrivateMariaDB | None
    sim: Simulator
    size: Size
    rng: random.Random
    # Cut in turn: a process's name, its proxy, and the VMs whose attaches it takes part in.
    proxies: list[tuple[str, TcpProxy, set[str]]] = field(default_factory=list)
    kills: int = 0
    nats_restarts: int = 0
    db_outage: float = 0.0
    cuts: Counter[str] = field(default_factory=Counter)  # per process
    faults: Counter[str] = field(default_factory=Counter)
    done: bool = False
    log: list[str] = field(default_factory=list)

    def note(self, t0: float, what: str) -> None:
        self.log.append(f"{time.monotonic() - t0:6.1f}s (at {time.time():.3f}) {what}")

    async def run(self) -> None:
        t0 = time.monotonic()
        span = self.size.span
        kill_at = sorted(self.rng.uniform(2.0, span) for _ in range(self.size.kills))
        nats_at = sorted(self.rng.uniform(0.15 * span, 0.9 * span) for _ in range(2))
        nats_at = nats_at[: self.size.nats_restarts]
        db_at = self.rng.uniform(0.2 * span, max(0.2 * span, 0.95 * span - self.size.db_outage))

        async def at(offset: float) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))

        async def kills() -> None:
            for n, offset in enumerate(kill_at):
                await at(offset)
                if n % 2:
                    # The most delicate moment: a mutation has just reached CloudStack, its
                    # answer (and job id) not yet stored (within 5 s, 0-50 ms into it).
                    what = await self.next_mutation(5.0)
                    await asyncio.sleep(self.rng.choice([0.0, 0.002, 0.01, 0.05]))
                else:
                    # A moment when commands are in flight (within 5 s), a little into them.
                    for _ in range(100):
                        if self.workload.in_flight:
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(self.rng.uniform(0.0, 0.4))
                    what = f"{len(self.workload.in_flight)} operations in flight"
                await self.volumed.kill()
                self.kills += 1
                self.note(t0, f"kill -9 volumed ({self.kills}): {what}")
                await asyncio.sleep(self.rng.uniform(0.0, 1.5))
                await self.volumed.start()

        async def nats_restarts() -> None:
            for offset in nats_at:
                await at(offset)
                await asyncio.to_thread(self.nats.stop)
                self.note(t0, "nats-server stopped")
                await asyncio.sleep(self.rng.uniform(1.0, 3.0))
                await asyncio.to_thread(self.nats.start)
                self.nats_restarts += 1
                self.note(t0, "nats-server started")

        async def db_outage() -> None:
            if self.db is None:
                return
            await at(db_at)
            await self.db.kill()
            down = time.monotonic()
            self.note(t0, "mariadbd killed")
            await asyncio.sleep(self.size.db_outage)
            await self.db.start()
            self.db_outage = time.monotonic() - down
            self.note(t0, f"mariadbd back after {self.db_outage:.1f} s")

        async def faults() -> None:
            while time.monotonic() - t0 < span:
                await asyncio.sleep(self.rng.uniform(0.5, 2.5))
                fault = self.random_fault()
                self.sim.inject(fault)
                self.faults[fault.kind] += 1

        cut_at = sorted(self.rng.uniform(3.0, span - 3.0) for _ in range(self.size.cuts))
        first = self.rng.randrange(len(self.proxies)) if self.proxies else 0

        async def cuts() -> None:
            for n, offset in enumerate(cut_at if self.proxies else []):
                await at(offset)
                name, proxy, vms = self.proxies[(first + n) % len(self.proxies)]
                # At an attach this process may take part in. Every other cut: just as its
                # device appears (the hand-off is out, the correlator's answer on its way);
                # else as it reaches CloudStack (its device appears during the cut). Either
                # way the answer, the hand-off or its event has to cross the cut.
                if n % 2 == 0:
                    what = await self.next_device(10.0, vms)
                    await asyncio.sleep(self.rng.uniform(0.0, 0.05))
                else:
                    what = await self.next_mutation(10.0, "attachVolume", vms=vms)
                    await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                seconds = self.rng.uniform(*CUT_SECONDS)
                await proxy.cut(seconds)
                self.cuts[name] += 1
                self.note(t0, f"connection of {name} cut for {seconds:.1f} s: {what}")

        await asyncio.gather(kills(), nats_restarts(), db_outage(), faults(), cuts())
        self.done = True

    async def next_mutation(
        self, timeout: float, *commands: str, vms: set[str] | None = None
    ) -> str:
        """Wait for the next mutation call (of ``commands``, or any; to one of ``vms``, or
        any) to reach the simulator; say which."""
        calls = self.sim.call_log
        since = max((c.seq for c in calls), default=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for call in calls.select(None, since):
                vm = call.params.get("virtualmachineid")
                if call.command in (commands or MUTATIONS) and (vms is None or vm in vms):
                    return f"{call.command} just sent" + (f" (VM {vm})" if vm else "")
            await asyncio.sleep(0.002)
        return f"no {'/'.join(commands) or 'mutation'} came"

    async def next_device(self, timeout: float, vms: set[str]) -> str:
        """Wait for the next attach to one of ``vms`` to reach the simulator, then for its
        device to appear in that VM; say which."""
        calls = self.sim.call_log
        since = max((c.seq for c in calls), default=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for call in calls.select("attachVolume", since):
                since = max(since, call.seq)
                vm, volume_id = call.params.get("virtualmachineid"), call.params.get("id")
                if vm not in vms or volume_id is None:
                    continue
                end = time.monotonic() + 5.0
                while time.monotonic() < end:
                    if volume_id in self.sim.devices_of(vm):
                        return f"the device of an attach appeared (VM {vm})"
                    await asyncio.sleep(0.002)
            await asyncio.sleep(0.002)
        return "no attach's device appeared"

    def random_fault(self) -> Fault:
        kind = self.rng.choice(["http", "http", "job", "drop", "accept_then_drop", "hang"])
        if kind == "http":
            return Fault(
                kind="http",
                status=self.rng.choice([503, 530]),
                command=self.rng.choice([None, *MUTATIONS]),
                count=self.rng.choice([1, 2]),
            )
        if kind == "job":
            return Fault(
                kind="job",
                command=self.rng.choice(["createVolume", "attachVolume", "detachVolume"]),
            )
        if kind == "hang":
            return Fault(kind="hang", seconds=1.0, command=self.rng.choice([None, *MUTATIONS]))
        return Fault(kind=kind, command=self.rng.choice(MUTATIONS))  # type: ignore[arg-type]


# -- reading the results ------------------------------------------------------------------


async def all_events(bus: Bus) -> list[dict[str, Any]]:
    info = await bus.js.stream_info("VOLUMED_EVENTS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg("VOLUMED_EVENTS", seq)
        except Exception:
            continue
        out.append(json.loads(msg.data or b"{}"))
    return out


async def consumer_backlog(bus: Bus) -> dict[str, tuple[int, int]]:
    """Per durable consumer: (messages not yet delivered, delivered and not acknowledged)."""
    out = {}
    for stream in ("VOLUMED_COMMANDS", "VOLUMED_EVENTS", "VOLUMED_CORRELATION"):
        for info in await bus.js.consumers_info(stream):
            out[f"{stream}/{info.name}"] = (info.num_pending or 0, info.num_ack_pending or 0)
    return out


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await predicate():
                return True
        await asyncio.sleep(0.5)
    return False


Query = Callable[[str], Awaitable[list[dict[str, Any]]]]


def refused_repeats(sim: Simulator) -> list[str]:
    """Mutations CloudStack refused because they repeated one already applied."""
    out = []
    jobs = sim.world.jobs
    for call in sim.calls:
        # An injected http error or dropped connection: CloudStack never saw the call.
        if call.command not in MUTATIONS or call.fault in ("http", "drop"):
            continue
        text = call.errortext or ""
        if call.jobid and call.jobid in jobs:
            job = jobs[call.jobid]
            if job.status == 2 and job.result:
                text = str(job.result.get("errortext", ""))
        if text and text != JOB_ERRORTEXT and any(r in text.lower() for r in REPEAT_REFUSALS):
            out.append(f"{call.command} {call.params}: {text}")
    return out


# -- the bugs the chaos found, each on its own --------------------------------------------


@pytest.mark.parametrize("command", ["attachVolume", "detachVolume"])
async def test_lost_answer_of_a_running_job_is_waited_for_not_resent(
    nats_server: NatsServer, database: Database, command: str
) -> None:
    """The answer to an attach/detach is lost while its job still runs: the volume still
    shows the old state, so a look-up alone would send the mutation again (refused as a
    repeat: the operation failed although the change was made). The executor waits for the
    job CloudStack lists on the volume, then looks."""
    async with Simulator(SimConfig(seed=21, job_latency=0.4)) as sim:
        settings = settings_for(nats_server, database, sim)
        v, task = await start_volumed(settings, ["persistence", "executor"], sim)
        try:
            volume_id = await create_volume(v, sim)
            if command == "detachVolume":
                a = new_op_id()
                body = {"operation_id": a, "volume_id": volume_id, "vm_id": remote_vm(sim)}
                await v.send("attach", body)
                assert (await v.terminal(a))["status"] == "completed"
            sim.inject(Fault(kind="accept_then_drop", command=command))
            o = new_op_id()
            if command == "attachVolume":
                body = {"operation_id": o, "volume_id": volume_id, "vm_id": remote_vm(sim)}
                await v.send("attach", body)
            else:
                await v.send("detach", {"operation_id": o, "volume_id": volume_id})
            event = await v.terminal(o)
            assert event["status"] == "completed", event
            assert refused_repeats(sim) == []
            assert len([c for c in sim.calls if c.command == command]) == 1
        finally:
            await stop_volumed(v, task)


async def test_create_whose_first_job_failed_finds_its_retry_by_name(
    nats_server: NatsServer, database: Database
) -> None:
    """A create's first job fails (CloudStack drops that volume), the retry's answer is lost:
    the look-up must not stop at the dropped volume's id, or a third create would leave the
    second volume an orphan."""
    async with Simulator(SimConfig(seed=22, job_latency=0.1)) as sim:
        settings = settings_for(nats_server, database, sim)
        v, task = await start_volumed(settings, ["persistence", "executor"], sim)
        try:
            sim.inject(Fault(kind="job", command="createVolume"))
            sim.inject(Fault(kind="accept_then_drop", command="createVolume"))
            o = new_op_id()
            await v.send("create", create_body(sim, o, "retried-then-lost"))
            event = await v.terminal(o)
            assert event["status"] == "completed", event
            named = [x.id for x in sim.volumes.values() if x.name == "retried-then-lost"]
            assert named == [event["volume_id"]]
        finally:
            await stop_volumed(v, task)


async def test_a_resumed_cancel_finds_its_own_work_done(
    nats_server: NatsServer, database: Database
) -> None:
    """Killed after it cancelled its target and before its own terminal event, a cancel is
    run again: it must complete (it did cancel the target), not fail not_cancellable. The
    cancelled event names the cancel that caused it; another cancel is still refused."""
    from actors.executor.operations import OperationFailed
    from actors.executor.run import cancel

    async with Simulator(SimConfig(seed=23, job_latency=2.0)) as sim:
        settings = settings_for(nats_server, database, sim)
        v, task = await start_volumed(settings, ["persistence", "executor"], sim)
        try:
            sim.set_latency(0.05)
            volume_id = await create_volume(v, sim)
            sim.set_latency(2.0)
            busy, waiting = new_op_id(), new_op_id()
            body = {"operation_id": busy, "volume_id": volume_id, "vm_id": remote_vm(sim)}
            await v.send("attach", body)
            await v.send("detach", {"operation_id": waiting, "volume_id": volume_id})
            await until_true(lambda: "pending" in v.statuses(waiting))
            executor: Any = v.supervisor.actors["executor"]  # type: ignore[attr-defined]
            first = await cancel(executor.deps, waiting, "cancel-1")
            again = await cancel(executor.deps, waiting, "cancel-1")  # the same cancel, resumed
            assert first.status == again.status == "cancelled"
            assert again.target == "cancel-1"
            with pytest.raises(OperationFailed) as refused:
                await cancel(executor.deps, waiting, "cancel-2")
            assert refused.value.code == "not_cancellable"
            assert (await v.terminal(busy))["status"] == "completed"
        finally:
            await stop_volumed(v, task)


async def until_true(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


# -- the test -----------------------------------------------------------------------------


async def test_crash_safety_under_chaos(tmp_path: Path) -> None:
    size = FULL if os.environ.get("VOLUMED_CRASH_FULL") == "1" else SMALL
    seed = int(os.environ.get("VOLUMED_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    print(f"\nseed: {seed} (VOLUMED_CRASH_SEED={seed} repeats this schedule)")
    sysfs, dev = fake_tree(tmp_path)
    vm_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(4)]
    host_a = Host("host-a", vm_ids[0], sysfs, dev, dev)
    b_root = tmp_path / "host-b"
    make_guest_tree(b_root / "sys", b_root / "dev", root_disk_bytes=20 * GIB)
    # Host B sees its /dev where host A sees its own (as two machines do), when it can.
    bind = can_bind_mount()
    host_b = Host("host-b", vm_ids[1], b_root / "sys", b_root / "dev", dev)
    if not bind:
        host_b.seen_dev = host_b.dev
        print("host-b: no mount namespace (not root), its /dev has a path of its own")
    hosts = [host_a, host_b]
    skew = rng.choice(size.skews)
    nats = NatsServer(store_dir=tmp_path / "jetstream")
    await asyncio.to_thread(nats.start)

    db: PrivateMariaDB | None = None
    if mariadb_binaries() is not None:
        db = PrivateMariaDB(tmp_path / "mariadb")
        await db.install()
        await db.start()
        dsn = db.dsn("volumed")
    else:
        print("mariadb: mariadbd not installed, the database outage is skipped (SQLite instead)")
        dsn = f"sqlite:///{tmp_path / 'volumed.db'}"

    async def query(sql: str) -> list[dict[str, Any]]:
        if db is not None:
            return await db.query("volumed", sql)
        with contextlib.closing(sqlite3.connect(tmp_path / "volumed.db")) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql)]

    config = SimConfig(
        seed=seed,
        # Host A's VM, host B's, and two VMs no host serves (remote attaches).
        vms=tuple(VMConfig(id=v) for v in vm_ids),
        local_vm_id=host_a.vm_id,
        sysfs_root=str(sysfs),
        dev_root=str(dev),
        guests=(
            GuestConfig(vm_id=host_b.vm_id, sysfs_root=str(host_b.sysfs), dev_root=str(host_b.dev)),
        ),
        serials=True,
        max_data_disks=64,
        job_latency=0.3,
        command_latency={"createVolume": 0.15, "attachVolume": 0.4},
        hotplug_delay=0.05,
        unplug_delay=0.05,
    )
    user_bus: Bus | None = None
    volumed: VolumedProcess | None = None
    others: list[VolumedProcess] = []  # host B's executor, its watcher and correlator
    proxies = {
        name: TcpProxy("127.0.0.1", nats.port)
        for name in ("volumed", "host-b executor", "host-b watcher+correlator")
    }
    log_path = tmp_path / "volumed.log"
    try:
        for proxy in proxies.values():
            await proxy.start()
        async with Simulator(config) as sim:
            watching = {
                "VOLUMED_DEVICES": "vd*",
                "VOLUMED_POLL_INTERVAL": "0.1",
                "VOLUMED_LOG_LEVEL": "INFO",
                "VOLUMED_HEARTBEAT_INTERVAL": "1",
            }
            env = volumed_env(
                proxies["volumed"].url,
                dsn,
                sim,
                VOLUMED_VM_ID=host_a.vm_id,
                VOLUMED_HOST_ID=host_a.name,
                VOLUMED_SYSFS=str(sysfs),
                VOLUMED_DEV=str(dev),
                **watching,
            )
            volumed = VolumedProcess(env, (), log_path=log_path)
            await volumed.start()
            user_bus = await Bus.connect(nats.url, "crash-user")
            user = User(user_bus)
            await user.start()
            # The streams exist once volumed has provisioned them.
            assert await until(lambda: _stream_exists(user_bus), 60), "volumed never provisioned"
            # Host B, its wall clock off (faketime moves every wall-clock read of a process;
            # the monotonic clock ticks as on any host): an executor, and its VM's watcher and
            # correlator, each a process of its own.
            host_b_env = {
                "VOLUMED_VM_ID": host_b.vm_id,
                "VOLUMED_HOST_ID": host_b.name,
                **skewed_clock(skew),
            }
            skewed = VolumedProcess(
                volumed_env(
                    proxies["host-b executor"].url,
                    dsn,
                    sim,
                    VOLUMED_LOG_LEVEL="INFO",
                    VOLUMED_HEARTBEAT_INTERVAL="1",
                    **host_b_env,
                ),
                ("executor",),
                log_path=tmp_path / "host-b-executor.log",
            )
            second = HostProcess(
                volumed_env(
                    proxies["host-b watcher+correlator"].url,
                    dsn,
                    sim,
                    VOLUMED_SYSFS=str(host_b.sysfs),
                    VOLUMED_DEV=str(host_b.seen_dev),
                    **watching,
                    **host_b_env,
                ),
                ("watcher", "correlator"),
                log_path=tmp_path / "host-b.log",
                bind=(host_b.dev, host_b.seen_dev) if bind else None,
            )
            others = [skewed, second]
            for process in others:
                await process.start()
            # Attaches to B's VM are correlated once B's correlator runs; the commands are
            # shared once the second executor runs.
            assert await until(lambda: _all_running(user_bus), 60), "a process never started"

            workload = Workload(user, sim, hosts, size, rng)
            takes_part = {
                "volumed": {host_a.vm_id},  # its executor, or host A's correlator
                "host-b executor": {host_a.vm_id, host_b.vm_id},
                "host-b watcher+correlator": {host_b.vm_id},
            }
            cut = [(name, p, takes_part[name]) for name, p in proxies.items()]
            chaos = Chaos(workload, volumed, nats, db, sim, size, rng, cut)
            started = time.monotonic()
            await asyncio.gather(chaos.run(), workload.run(lambda: not chaos.done))
            sim.clear_faults()
            run_time = time.monotonic() - started
            print("\n".join(chaos.log))

            # Let everything settle: no backlog, every row terminal, the mappings converged.
            assert await until(lambda: _no_backlog(user_bus), 150), (
                f"backlog left: {await consumer_backlog(user_bus)}"
            )
            sent = set(workload.ops)

            async def rows_final() -> bool:
                rows = await query("SELECT id, status FROM volume_operations")
                done = {r["id"] for r in rows if r["status"] in TERMINAL}
                return sent <= done

            await until(rows_final, 90)
            await until(lambda: _mappings_match(query, sim, hosts), 30)
            code = await volumed.stop()
            volumed = None
            codes = [await p.stop() for p in others]
            others = []

            # For whoever reads a failure: every CloudStack call and the chaos, in order.
            with open(tmp_path / "calls.jsonl", "w") as f:
                for call in sim.calls:
                    f.write(json.dumps(msgspec.to_builtins(call)) + "\n")
            (tmp_path / "chaos.log").write_text("\n".join(chaos.log) + "\n")
            problems = list(workload.problems)
            if code != 0:
                problems.append(f"volumed exited {code} on SIGTERM")
            if any(codes):
                problems.append(f"host B's executor and watcher exited {codes} on SIGTERM")
            counts = await _check(workload, sim, hosts, user_bus, query, problems)
    finally:
        if volumed is not None:
            await volumed.kill()
        for process in others:
            await process.kill()
        for proxy in proxies.values():
            await proxy.close()
        if user_bus is not None:
            with contextlib.suppress(Exception):
                await user_bus.close()
        if db is not None:
            await db.stop()
        await asyncio.to_thread(nats.stop)

    lines = {
        "operations": len(workload.ops),
        **{
            f"operations_{t}": n
            for t, n in sorted(Counter(o.type for o in workload.ops.values()).items())
        },
        "duplicate_sends": workload.deliberate_dups,
        "kills": chaos.kills,
        "nats_restarts": chaos.nats_restarts,
        "mariadb_outage_seconds": round(chaos.db_outage, 1),
        "cloudstack_faults": sum(chaos.faults.values()),
        "hosts": len(hosts),
        "host_b_dev_same_path_as_a": bind,
        "host_b_clock": skew,
        "connection_cuts": sum(chaos.cuts.values()),
        **{"cuts_" + re.sub(r"\W+", "_", name): n for name, n in sorted(chaos.cuts.items())},
        "run_seconds": round(run_time, 1),
        "operations_resumed_after_kill": log_path.read_text(errors="replace").count(
            "resuming operation"
        ),
        **counts,
    }
    for name, value in lines.items():
        print(f"{name}: {value}")
    print(f"volumed log: {log_path}")
    assert not problems, "\n".join(problems[:50])
    assert len(workload.ops) >= size.operations
    assert chaos.kills >= size.kills
    assert chaos.nats_restarts >= size.nats_restarts
    assert sum(chaos.cuts.values()) >= size.cuts
    if db is not None:
        assert chaos.db_outage >= size.db_outage
    assert counts["terminal_states"] == len(workload.ops)
    assert counts["duplicates_found"] == 0


async def _stream_exists(bus: Bus) -> bool:
    await bus.js.stream_info("VOLUMED_EVENTS")
    await bus.js.stream_info("VOLUMED_COMMANDS")
    return True


async def _no_backlog(bus: Bus) -> bool:
    backlog = await consumer_backlog(bus)
    return bool(backlog) and all(p == 0 and a == 0 for p, a in backlog.values())


async def _all_running(bus: Bus) -> bool:
    """Two executors, and both hosts' watcher and correlator, have sent a heartbeat."""
    keys = await (await bus.js.key_value("volumed_health")).keys()
    kinds = Counter(k.split(".", 1)[0] for k in keys)
    return kinds["executor"] >= 2 and kinds["watcher"] >= 2 and kinds["correlator"] >= 2


def _expected_mappings(sim: Simulator, hosts: list[Host]) -> dict[str, tuple[str, str | None]]:
    """volume id → (vm id, device path) for every data volume attached now: on a host's VM,
    the device the simulator plugged there, as that host names it."""
    served = {h.vm_id: h for h in hosts}
    out = {}
    for volume in sim.world.volumes.values():
        if volume.type == "DATADISK" and volume.vm_id is not None:
            host = served.get(volume.vm_id)
            name = sim.devices_of(volume.vm_id).get(volume.id) if host is not None else None
            out[volume.id] = (volume.vm_id, str(host.seen_dev / name) if host and name else None)
    return out


async def _mappings_match(query: Query, sim: Simulator, hosts: list[Host]) -> bool:
    rows = await query("SELECT volume_id, vm_id, device_path FROM device_mappings")
    found = {r["volume_id"]: (r["vm_id"], r["device_path"]) for r in rows}
    return found == _expected_mappings(sim, hosts)


async def _check(
    w: Workload, sim: Simulator, hosts: list[Host], bus: Bus, query: Query, problems: list[str]
) -> dict[str, int]:
    # Terminal events, from the stream.
    events = await all_events(bus)
    terminal: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("status") in TERMINAL:
            terminal.setdefault(str(e.get("operation_id")), []).append(e)
    missing = extra = conflicting = 0
    statuses: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for op in w.ops.values():
        found = terminal.get(op.id, [])
        kinds = {e["status"] for e in found}
        if not found:
            missing += 1
            problems.append(f"{op.id}: no terminal event in VOLUMED_EVENTS")
            continue
        if len(kinds) > 1:
            conflicting += 1
            problems.append(f"{op.id}: several terminal states {sorted(kinds)}")
        elif len(found) > 1 and not op.resent:
            extra += 1
            problems.append(f"{op.id}: {len(found)} terminal events, sent once")
        statuses[found[0]["status"]] += 1
        if found[0]["status"] == "failed":
            codes[str((found[0].get("error") or {}).get("code"))] += 1
        if op.terminal is not None and op.terminal["status"] not in kinds:
            problems.append(f"{op.id}: the user saw {op.terminal['status']}, the stream {kinds}")
    strangers = set(terminal) - set(w.ops)
    if strangers:
        problems.append(f"terminal events of operations never sent: {sorted(strangers)[:5]}")

    # Rows.
    rows = {r["id"]: r for r in await query("SELECT * FROM volume_operations")}
    rows_missing = rows_wrong = 0
    for op in w.ops.values():
        row = rows.get(op.id)
        final = terminal.get(op.id, [{}])[0].get("status")
        if row is None or row["status"] not in TERMINAL:
            rows_missing += 1
            problems.append(f"{op.id}: row {row and row['status']}, not terminal")
        elif row["status"] != final:
            rows_wrong += 1
            problems.append(f"{op.id}: row {row['status']}, event {final}")
        elif op.expected_device is not None and row["device_path"] != op.expected_device:
            w.mapping_errors += 1
            problems.append(f"{op.id}: row device {row['device_path']} != {op.expected_device}")
    rows_extra = len(set(rows) - set(w.ops))
    if rows_extra:
        problems.append(f"{rows_extra} rows of operations never sent")

    # CloudStack: volumes, mutations, repeats.
    data_volumes = {v.id for v in sim.world.volumes.values() if v.type == "DATADISK"}
    should = w.created - w.deleted
    orphans, lost = data_volumes - should, should - data_volumes
    for v in orphans:
        problems.append(f"orphan volume in CloudStack: {sim.world.volumes[v].name} {v}")
    for v in lost:
        problems.append(f"volume {v} of a completed create is gone without a completed delete")
    mutation_mismatch = 0
    for volume_id in sorted(w.created - w.untracked):
        applied = sim.mutations.get(volume_id, 0)
        if applied != w.expected[volume_id]:
            mutation_mismatch += 1
            problems.append(
                f"volume {volume_id}: CloudStack applied {applied} changes, the operations "
                f"account for {w.expected[volume_id]}"
            )
    repeats = refused_repeats(sim)
    problems.extend(f"repeated mutation refused: {r}" for r in repeats)
    problems.extend(f"failed but half done: {h}" for h in w.half_done)

    # Device mappings now.
    map_rows = await query("SELECT volume_id, vm_id, device_path FROM device_mappings")
    found_maps = {r["volume_id"]: (r["vm_id"], r["device_path"]) for r in map_rows}
    want_maps = _expected_mappings(sim, hosts)
    wrong_maps = [
        v for v in sorted(set(found_maps) | set(want_maps)) if found_maps.get(v) != want_maps.get(v)
    ]
    for v in wrong_maps:
        problems.append(
            f"device_mappings of {v}: {found_maps.get(v)}, attached: {want_maps.get(v)}"
        )
    mapping_errors = len(wrong_maps) + w.mapping_errors
    # One path on both hosts' VMs (each its own disk), as on two real machines.
    paths_by_vm: dict[str, set[str]] = {}
    for vm_id, path in found_maps.values():
        if path is not None:
            paths_by_vm.setdefault(vm_id, set()).add(path)
    a_paths, b_paths = (paths_by_vm.get(h.vm_id, set()) for h in hosts)
    problems.extend(f"attach {r}" for r in w.rolled_back)

    dead = (await bus.js.stream_info("VOLUMED_DEAD_LETTERS")).state.messages
    if dead:
        problems.append(f"{dead} dead letters")
    backlog = await consumer_backlog(bus)
    stuck = sum(p + a for p, a in backlog.values())
    if stuck:
        problems.append(f"consumer backlog at the end: {backlog}")

    return {
        "terminal_states": sum(statuses.values()),
        **{f"terminal_{s}": n for s, n in sorted(statuses.items())},
        **{f"failed_{c}": n for c, n in sorted(codes.items())},
        "missing_terminal": missing,
        "extra_terminal_events": extra,
        "conflicting_terminal_states": conflicting,
        "rows": len(rows),
        "rows_missing_or_not_terminal": rows_missing,
        "rows_wrong_status": rows_wrong,
        "rows_extra": rows_extra,
        "volumes_created": len(w.created),
        "volumes_deleted": len(w.deleted),
        "volumes_left": len(data_volumes),
        "orphan_volumes": len(orphans),
        "lost_volumes": len(lost),
        "host_attaches_completed": w.local_attaches,
        **{
            f"attaches_completed_{h.name.replace('-', '_')}": w.host_attaches[h.name] for h in hosts
        },
        "attaches_rolled_back": len(w.rolled_back),
        "mapping_rows_at_end": len(found_maps),
        "device_paths_on_both_hosts_at_end": len(a_paths & b_paths),
        "mapping_errors": mapping_errors,
        "half_done_failures": len(w.half_done),
        "duplicates_found": mutation_mismatch + len(repeats),
        "dead_letters": dead,
        "backlog_left": stuck,
    }
