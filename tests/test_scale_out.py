"""Scale-out (issue 9): several executor processes and several hosts share the work safely.

Real processes against a real nats-server, the machine's MariaDB and the CloudStack simulator
(in-process, with job latency so that operations overlap):

- three `volumed run executor persistence` processes, all told they are host A's VM;
- two simulated hosts, A and B, each `volumed run watcher correlator` with its own VM id,
  fake sysfs and /dev (the simulator hot-plugs into each VM's own tree) and host id;
- a third VM that no host serves.

The workload creates N volumes (waiting for them), then sends for every volume at once, back
to back without waiting: attach (to A's or B's VM, alternately; a few to the third VM),
detach, attach (to the other host), detach, delete. When about a third of those operations
have ended, one executor is killed with SIGKILL and started again a few seconds later.

Checks, each reported on its own when it fails:

1. every operation ends exactly once: exactly one terminal event in the VOLUMED_EVENTS stream,
   and its row in volume_operations (written by three persistence processes) says the same;
2. every operation completed;
3. per-volume order: for consecutive operations k, k+1 on a volume (in the order they were
   published), k+1's `executing` is stored in the events stream after k's terminal event;
4. no CloudStack mutation sent twice: one accepted createVolume per create name; per volume
   the accepted attachVolume / detachVolume / deleteVolume calls are exactly the ones its
   operations needed, in order (simulator call log);
5. no device mapped across hosts: a completed attach to A's or B's VM names a device under
   that host's /dev that the simulator made for that volume in that host's tree (its sysfs
   serial is the volume's); an attach to the third VM names no device;
6. at the end no device_mappings row is left and no volume is left in CloudStack.

`VOLUMED_SCALE_EXECUTORS=1` runs it with one executor process (the rest unchanged), to tell
the test's own faults from the scale-out's. With `-s` it prints its counts as `name: value`
lines; the processes' logs stay in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from schemas.common import GIB
from simulator import GuestConfig, SimConfig, Simulator, VMConfig
from simulator.hotplug import make_guest_tree
from tests.conftest import Database, NatsServer, VolumedProcess, volumed_env, wait_for

VOLUMES = 40
"""Volumes of the workload: each has 6 operations (create, attach, detach, attach, detach,
delete), 240 in all."""
EXECUTORS = int(os.environ.get("VOLUMED_SCALE_EXECUTORS", "3"))
"""Executor processes; 1 tells the test's own faults from the scale-out's (the order within
one process is kept today)."""
KILL_AT = 1 / 3
"""The share of the second phase's operations that have ended when an executor is killed."""
RESTART_AFTER = 3.0
JOB_LATENCY = 0.15
ROWS_WAIT = 45.0
"""How long the rows may lag the events: more than the persistence consumer's ack wait."""
TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})
EXAMPLES = 8


@dataclass
class Host:
    name: str
    vm_id: str
    sysfs: Path
    dev: Path


@dataclass
class Op:
    id: str
    type: str
    volume: int
    """Index of the volume in the workload."""
    vm_id: str | None = None
    """Attach: the VM it attaches to."""


@dataclass
class Workload:
    run: str
    ops: dict[str, Op] = field(default_factory=dict)
    lanes: dict[int, list[str]] = field(default_factory=dict)
    """Volume index -> its operations' ids in publish order."""
    volume_ids: dict[int, str] = field(default_factory=dict)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Operation id -> its terminal event, from a core subscription (progress only)."""

    def add(self, op: Op) -> Op:
        self.ops[op.id] = op
        self.lanes.setdefault(op.volume, []).append(op.id)
        return op

    def name(self, index: int) -> str:
        return f"{self.run}-{index}"


async def test_executors_and_hosts_scale_out(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    hosts = [_host(tmp_path, "host-a"), _host(tmp_path, "host-b")]
    a, b = hosts
    stranger = str(uuid.uuid4())  # a VM no host serves
    config = SimConfig(
        seed=91,
        vms=(VMConfig(id=a.vm_id), VMConfig(id=b.vm_id), VMConfig(id=stranger)),
        sysfs_root=str(a.sysfs),
        dev_root=str(a.dev),
        guests=(GuestConfig(vm_id=b.vm_id, sysfs_root=str(b.sysfs), dev_root=str(b.dev)),),
        max_data_disks=64,
        job_latency=JOB_LATENCY,
        hotplug_delay=0.05,
        unplug_delay=0.05,
    )
    async with Simulator(config) as sim:
        common = {"VOLUMED_HEARTBEAT_INTERVAL": "0.5", "VOLUMED_LOG_LEVEL": "INFO"}
        executors = [
            VolumedProcess(
                volumed_env(
                    nats_server.url,
                    database.dsn,
                    sim,
                    VOLUMED_VM_ID=a.vm_id,
                    VOLUMED_HOST_ID=a.name,
                    **common,
                ),
                ("executor", "persistence"),
                log_path=tmp_path / f"executor-{n}.log",
            )
            for n in range(1, EXECUTORS + 1)
        ]
        watchers = [
            VolumedProcess(
                volumed_env(
                    nats_server.url,
                    database.dsn,
                    sim,
                    VOLUMED_VM_ID=h.vm_id,
                    VOLUMED_HOST_ID=h.name,
                    VOLUMED_SYSFS=str(h.sysfs),
                    VOLUMED_DEV=str(h.dev),
                    VOLUMED_DEVICES="vd*",
                    VOLUMED_POLL_INTERVAL="0.1",
                    **common,
                ),
                ("watcher", "correlator"),
                log_path=tmp_path / f"{h.name}.log",
            )
            for h in hosts
        ]
        processes = [*executors, *watchers]
        for process in processes:
            await process.start()
        bus = await Bus.connect(nats_server.url, "scale-out-test")
        w = Workload(run=f"so-{uuid.uuid4().hex[:6]}")
        counts: dict[str, Any] = {}
        try:
            await _follow(bus, w)
            await wait_for(_ready(bus, executors=EXECUTORS), timeout=60, interval=0.2)
            started = time.monotonic()
            await _create_all(bus, sim, w)
            counts["create_seconds"] = round(time.monotonic() - started, 1)
            second = time.monotonic()
            killer = asyncio.create_task(_kill_and_restart(bus, w, executors[-1], counts))
            await asyncio.gather(*(_lifecycle(bus, w, i, a, b, stranger) for i in w.volume_ids))
            await _all_ended(w, timeout=100)
            with contextlib.suppress(AssertionError, TimeoutError):  # reported below
                await asyncio.wait_for(killer, 30)
            counts["lifecycle_seconds"] = round(time.monotonic() - second, 1)
            problems = await _check(bus, sim, database, w, hosts, stranger, counts)
        finally:
            await bus.close()
            for process in processes:
                await process.stop()
    for name, value in counts.items():
        print(f"{name}: {value}")
    print(f"logs: {tmp_path}")
    if any(problems.values()):
        pytest.fail(_report(problems), pytrace=False)


# -- set-up ------------------------------------------------------------------------------


def _host(tmp_path: Path, name: str) -> Host:
    host = Host(name, str(uuid.uuid4()), tmp_path / name / "sys", tmp_path / name / "dev")
    make_guest_tree(host.sysfs, host.dev, root_disk_bytes=8 * GIB)
    return host


def _ready(
    bus: Bus, *, executors: int, after: set[str] | None = None
) -> Callable[[], Awaitable[bool]]:
    """A predicate: ``executors`` executor heartbeats (beyond the keys ``after``) and both
    hosts' watcher and correlator heartbeats are in."""

    async def ready() -> bool:
        try:
            keys = set(await (await bus.js.key_value("volumed_health")).keys())
        except Exception:  # not provisioned yet, or empty
            return False
        fresh = keys - (after or set())
        kinds = Counter(k.split(".", 1)[0] for k in fresh)
        return kinds["executor"] >= executors and (
            after is not None or (kinds["watcher"] >= 2 and kinds["correlator"] >= 2)
        )

    return ready


async def _follow(bus: Bus, w: Workload) -> None:
    async def on_event(_subject: str, data: bytes, _reply: str | None) -> None:
        event = json.loads(data)
        if event.get("status") in TERMINAL and event["operation_id"] in w.ops:
            w.seen.setdefault(event["operation_id"], event)

    await bus.subscribe("volume.events.>", on_event)


async def _send(bus: Bus, op: Op, body: dict[str, Any]) -> None:
    await bus.publish(f"volume.cmd.{op.type}", {**body, "operation_id": op.id})


# -- the workload ------------------------------------------------------------------------


async def _create_all(bus: Bus, sim: Simulator, w: Workload) -> None:
    ops = [w.add(Op(f"{w.run}-{i}-create", "create", i)) for i in range(VOLUMES)]
    for op in ops:
        body = {
            "name": w.name(op.volume),
            "size": GIB,
            "disk_offering_id": sim.disk_offering_ids[0],
            "zone_id": sim.zone_id,
        }
        await _send(bus, op, body)
    await _all_ended(w, timeout=60)
    for op in ops:
        event = w.seen.get(op.id)
        if event and event["status"] == "completed":
            w.volume_ids[op.volume] = str(event["volume_id"])
    assert len(w.volume_ids) == VOLUMES, (
        f"the creates did not all complete, the test cannot go on: "
        f"{[w.seen.get(op.id) for op in ops if op.volume not in w.volume_ids][:5]}"
    )


def _attach_targets(index: int, a: Host, b: Host, stranger: str) -> tuple[str, str]:
    """The VMs of a volume's two attaches: A then B, or B then A; every eighth volume's
    second attach goes to the VM no host serves."""
    first, second = (a.vm_id, b.vm_id) if index % 2 == 0 else (b.vm_id, a.vm_id)
    if index % 8 == 3:
        second = stranger
    return first, second


async def _lifecycle(bus: Bus, w: Workload, index: int, a: Host, b: Host, stranger: str) -> None:
    """Send one volume's operations back to back: each is accepted (PubAck) before the next
    is sent, none waits for the one before to end."""
    volume_id = w.volume_ids[index]
    first, second = _attach_targets(index, a, b, stranger)
    steps: list[tuple[str, str | None]] = [
        ("attach", first),
        ("detach", None),
        ("attach", second),
        ("detach", None),
        ("delete", None),
    ]
    for n, (op_type, vm_id) in enumerate(steps, start=1):
        op = w.add(Op(f"{w.run}-{index}-{n}-{op_type}", op_type, index, vm_id))
        body: dict[str, Any] = {"volume_id": volume_id}
        if vm_id is not None:
            body["vm_id"] = vm_id
        await _send(bus, op, body)


async def _kill_and_restart(
    bus: Bus, w: Workload, victim: VolumedProcess, counts: dict[str, Any]
) -> None:
    """SIGKILL ``victim`` once about a third of the lifecycle operations have ended, start it
    again RESTART_AFTER seconds later and wait until it beats."""
    lifecycle = 5 * VOLUMES

    def ended() -> int:
        return sum(1 for op_id in w.seen if w.ops[op_id].type != "create")

    counts["killed"] = counts["restarted"] = False
    before = set(await (await bus.js.key_value("volumed_health")).keys())
    await wait_for(lambda: ended() >= lifecycle * KILL_AT, timeout=60, interval=0.01)
    counts["ended_at_kill"] = ended()
    await victim.kill()
    counts["killed"] = True
    await asyncio.sleep(RESTART_AFTER)
    counts["ended_at_restart"] = ended()
    await victim.start()
    await wait_for(_ready(bus, executors=1, after=before), timeout=30, interval=0.2)
    counts["restarted"] = True


async def _all_ended(w: Workload, timeout: float) -> None:
    """Wait until every operation sent has a terminal event (or the time is up: the checks
    then say which did not end)."""
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: len(w.seen) >= len(w.ops), timeout, interval=0.1)


# -- the checks --------------------------------------------------------------------------


async def stored_events(bus: Bus) -> list[tuple[int, dict[str, Any]]]:
    """Every event in the VOLUMED_EVENTS stream with its stream sequence, in stored order."""
    info = await bus.js.stream_info("VOLUMED_EVENTS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("VOLUMED_EVENTS", seq)
        out.append((seq, json.loads(msg.data or b"{}")))
    return out


async def _check(
    bus: Bus,
    sim: Simulator,
    database: Database,
    w: Workload,
    hosts: list[Host],
    stranger: str,
    counts: dict[str, Any],
) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    chaos = problems.setdefault("0. an executor was killed (SIGKILL) mid-way and restarted", [])
    if not counts.get("killed"):
        chaos.append("no executor was killed: a third of the operations never ended")
    elif not counts.get("restarted"):
        chaos.append("the killed executor did not beat again within 30 s of its restart")
    events = await stored_events(bus)
    terminal: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    executing: dict[str, list[int]] = {}
    for seq, e in events:
        op_id = str(e.get("operation_id"))
        if e.get("status") in TERMINAL:
            terminal.setdefault(op_id, []).append((seq, e))
        elif e.get("status") == "executing":
            executing.setdefault(op_id, []).append(seq)

    # 1. Exactly one terminal event per operation, and its row (the three writers') agrees.
    once = problems.setdefault(
        "1. every operation ends exactly once (VOLUMED_EVENTS; its volume_operations row agrees)",
        [],
    )
    for op in w.ops.values():
        found = terminal.get(op.id, [])
        if not found:
            once.append(f"{op.id}: no terminal event")
        elif len(found) > 1:
            once.append(f"{op.id}: {len(found)} terminal events {[e['status'] for _, e in found]}")
    counts["operations"] = len(w.ops)
    counts["terminal_events"] = sum(len(found) for found in terminal.values())
    wanted = {op_id: found[0][1]["status"] for op_id, found in terminal.items() if op_id in w.ops}
    rows: dict[str, object] = {}

    async def rows_agree() -> bool:
        nonlocal rows
        found = await database.query(
            "SELECT id, status FROM volume_operations WHERE id LIKE %s", f"{w.run}-%"
        )
        rows = {str(r["id"]): r["status"] for r in found}
        return all(rows.get(op_id) == status for op_id, status in wanted.items())

    # Events that the killed process's persistence had taken, uncommitted, come back to the
    # others only after the consumer's ack wait (PERSISTENCE.ack_wait): allow for it.
    waited = time.monotonic()
    with contextlib.suppress(AssertionError):
        await wait_for(rows_agree, timeout=ROWS_WAIT, interval=0.2)
    counts["rows_caught_up_seconds"] = round(time.monotonic() - waited, 1)
    once.extend(
        f"{op_id}: row {rows.get(op_id)}, terminal event {status}"
        for op_id, status in wanted.items()
        if rows.get(op_id) != status
    )

    # 2. All completed.
    completed = problems.setdefault("2. every operation completed", [])
    statuses: Counter[str] = Counter()
    for op in w.ops.values():
        found = terminal.get(op.id)
        if not found:
            continue
        event = found[0][1]
        code = (event.get("error") or {}).get("code")
        statuses[f"{op.type} {event['status']}" + (f" {code}" if code else "")] += 1
        if event["status"] != "completed":
            message = (event.get("error") or {}).get("message")
            completed.append(f"{op.id}: {event['status']} {code}: {message}")
    counts.update({f"ended {k}": v for k, v in sorted(statuses.items())})

    # 3. Per-volume order: k+1 executes only after k's terminal event is stored.
    order = problems.setdefault(
        "3. per-volume order (k+1's executing stored after k's terminal event)", []
    )
    overlaps = 0
    for lane in w.lanes.values():
        for before, after in itertools.pairwise(lane):
            ended = terminal.get(before)
            started = executing.get(after)
            if not ended or not started:
                order.append(
                    f"{after} after {before}: "
                    + ("no terminal event of the earlier" if not ended else "never executing")
                )
                continue
            if min(started) < ended[0][0]:
                overlaps += 1
                order.append(
                    f"{after} executing at seq {min(started)}, before {before} ended "
                    f"({ended[0][1]['status']}) at seq {ended[0][0]}"
                )
    counts["order_violations"] = overlaps

    # 4. No mutation sent twice; per volume exactly the ones its operations needed.
    twice = problems.setdefault(
        "4. no CloudStack mutation sent twice: per volume exactly the ones its operations "
        "needed, in order (simulator call log)",
        [],
    )
    for index in w.lanes:
        creates = [c for c in sim.call_log.select("createVolume", name=w.name(index)) if c.accepted]
        if len(creates) != 1:
            twice.append(f"create {w.name(index)}: {len(creates)} accepted createVolume calls")
        volume_id = w.volume_ids.get(index)
        if volume_id is None:
            continue
        sent = [
            (c.command, c.params.get("virtualmachineid"))
            for c in sim.call_log.mutations(volume_id)
            if c.command != "createVolume"
        ]
        needed = [
            ("attachVolume" if op.type == "attach" else f"{op.type}Volume", op.vm_id)
            for op in (w.ops[o] for o in w.lanes[index])
            if op.type != "create"
        ]
        if sent != needed:
            twice.append(f"volume {volume_id}: sent {_calls(sent)}, needed {_calls(needed)}")
    counts["mutations_accepted"] = len(sim.call_log.mutations())

    # 5. No device mapped across hosts.
    crossed = problems.setdefault(
        "5. no device mapped across hosts (a completed attach names its own host's device)", []
    )
    by_vm = {h.vm_id: h for h in hosts}
    attaches: Counter[str] = Counter()
    for op in w.ops.values():
        found = terminal.get(op.id)
        if op.type != "attach" or not found or found[0][1]["status"] != "completed":
            continue
        event = found[0][1]
        volume_id = w.volume_ids[op.volume]
        device, by_id = event.get("device_path"), event.get("by_id_path")
        host = by_vm.get(str(op.vm_id))
        if host is None:
            attaches["stranger"] += 1
            if device is not None or by_id is not None:
                crossed.append(f"{op.id} to the VM no host serves named a device: {device}")
            continue
        attaches[host.name] += 1
        names = [n for v, n in sim.plugged_into(host.vm_id) if v == volume_id]
        allowed = {str(host.dev / n) for n in names}
        if device not in allowed:
            elsewhere = [
                h.name for h in hosts if device and str(device).startswith(f"{h.dev}{os.sep}")
            ]
            crossed.append(
                f"{op.id} to {host.name}: device {device}"
                + (f" (under {elsewhere[0]}'s /dev)" if elsewhere else "")
                + f", the volume's device there was {sorted(allowed) or 'never made'}"
            )
        elif by_id is not None and not str(by_id).startswith(f"{host.dev}{os.sep}"):
            crossed.append(f"{op.id} to {host.name}: by-id link {by_id} not under its /dev")
    counts.update({f"attaches_completed_{k}": v for k, v in sorted(attaches.items())})

    # 6. Nothing left: no mapping rows (once the writers caught up), no volumes, no devices.
    left = problems.setdefault("6. nothing left (device_mappings, volumes, devices)", [])
    mappings: list[dict[str, object]] = []

    async def no_mappings() -> bool:
        nonlocal mappings
        mappings = await database.query("SELECT volume_id, vm_id, device_path FROM device_mappings")
        return not mappings

    try:
        await wait_for(no_mappings, timeout=15, interval=0.2)
    except AssertionError:
        left.extend(f"device_mappings row {r}" for r in mappings)
    mine = set(w.volume_ids.values())
    left.extend(
        f"volume {v.id} ({v.name}) is still in CloudStack"
        + (f", attached to {v.vm_id}" if v.vm_id else "")
        for v in sim.volumes.values()
        if v.id in mine or v.name.startswith(w.run)
    )
    for h in hosts:
        left.extend(
            f"{h.name}: device {n} of volume {v}" for v, n in sim.devices_of(h.vm_id).items()
        )
    return problems


def _calls(calls: list[tuple[str, str | None]]) -> str:
    return "[" + ", ".join(f"{c}({vm[:8]})" if vm else c for c, vm in calls) + "]"


def _report(problems: dict[str, list[str]]) -> str:
    """One section per failing check: how many, and the first few examples."""
    lines = ["scale-out checks failed:"]
    for check, found in problems.items():
        if not found:
            lines.append(f"  ok    {check}")
            continue
        lines.append(f"  FAIL  {check}: {len(found)}")
        lines.extend(f"          {p}" for p in found[:EXAMPLES])
        if len(found) > EXAMPLES:
            lines.append(f"          ... and {len(found) - EXAMPLES} more")
    return "\n".join(lines)
