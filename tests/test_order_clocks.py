"""A second executor whose wall clock runs 40 s ahead (issue 13, "Clocks"), as real processes.

Host A runs `volumed run executor persistence watcher correlator` (its VM's watcher and
correlator, a fake sysfs and /dev the simulator hot-plugs into); host B runs
`volumed run executor` under Debian's faketime (+40 s: its events' ``at`` are 40 s ahead)
with its own host id (another host's clock). Volumes are attached to A's VM, detached and
attached again, back to back: the two executors share the commands, so a volume's operations
end on different clocks. Every volume must end with the row of its second attach (its
operation and its device), whatever the clocks say.

faketime rather than a clock injected into the process: it moves every wall-clock read of
the process (time.time, datetime.now, the C library), as a host whose clock is off would,
with no test hook in volumed. scripts/test installs it when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

from bus import Bus
from schemas.common import GIB
from simulator import SimConfig, Simulator, VMConfig
from simulator.hotplug import make_guest_tree
from tests.conftest import Database, NatsServer, VolumedProcess, skewed_clock, volumed_env, wait_for

VOLUMES = 6
SKEW = "+40s"
TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})


async def test_an_executor_whose_clock_runs_ahead_leaves_every_row_right(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = tmp_path / "a" / "sys", tmp_path / "a" / "dev"
    make_guest_tree(sysfs, dev, root_disk_bytes=8 * GIB)
    vm_a, vm_b = str(uuid.uuid4()), str(uuid.uuid4())
    config = SimConfig(
        seed=13,
        vms=(VMConfig(id=vm_a), VMConfig(id=vm_b)),
        local_vm_id=vm_a,
        sysfs_root=str(sysfs),
        dev_root=str(dev),
        job_latency=0.05,
        hotplug_delay=0.05,
        unplug_delay=0.05,
    )
    async with Simulator(config) as sim:
        common = {"VOLUMED_HEARTBEAT_INTERVAL": "0.5", "VOLUMED_LOG_LEVEL": "INFO"}
        a = VolumedProcess(
            volumed_env(
                nats_server.url,
                database.dsn,
                sim,
                VOLUMED_VM_ID=vm_a,
                VOLUMED_HOST_ID="host-a",
                VOLUMED_SYSFS=str(sysfs),
                VOLUMED_DEV=str(dev),
                VOLUMED_DEVICES="vd*",
                VOLUMED_POLL_INTERVAL="0.1",
                **common,
            ),
            ("executor", "persistence", "watcher", "correlator"),
            log_path=tmp_path / "host-a.log",
        )
        b = VolumedProcess(
            volumed_env(
                nats_server.url,
                database.dsn,
                sim,
                VOLUMED_VM_ID=vm_b,
                VOLUMED_HOST_ID="host-b",
                **skewed_clock(SKEW),
                **common,
            ),
            ("executor",),
            log_path=tmp_path / "host-b.log",
        )
        bus = await Bus.connect(nats_server.url, "clocks-test")
        ended: dict[str, dict[str, Any]] = {}

        async def on_event(_subject: str, data: bytes, _reply: str | None) -> None:
            event = json.loads(data)
            if event.get("status") in TERMINAL:
                ended.setdefault(event["operation_id"], event)

        run = uuid.uuid4().hex[:6]

        async def send(op_id: str, op_type: str, body: dict[str, Any]) -> str:
            await bus.publish(f"volume.cmd.{op_type}", {**body, "operation_id": op_id})
            return op_id

        try:
            await bus.subscribe("volume.events.>", on_event)
            await a.start()
            await b.start()
            await wait_for(lambda: _executors_beat(bus, 2), timeout=60, interval=0.2)
            creates = [
                await send(
                    f"{run}-{i}-create",
                    "create",
                    {
                        "name": f"{run}-{i}",
                        "size": GIB,
                        "disk_offering_id": sim.disk_offering_ids[0],
                        "zone_id": sim.zone_id,
                    },
                )
                for i in range(VOLUMES)
            ]
            await wait_for(lambda: all(c in ended for c in creates), timeout=60, interval=0.1)
            volumes = [str(ended[c]["volume_id"]) for c in creates]
            lanes: list[list[str]] = []
            for i, volume_id in enumerate(volumes):
                lane = []
                for n, op_type in enumerate(("attach", "detach", "attach"), start=1):
                    body: dict[str, Any] = {"volume_id": volume_id}
                    if op_type == "attach":
                        body["vm_id"] = vm_a
                    lane.append(await send(f"{run}-{i}-{n}-{op_type}", op_type, body))
                lanes.append(lane)
            every = [op for lane in lanes for op in lane]
            await wait_for(lambda: all(op in ended for op in every), timeout=90, interval=0.1)
            failed = {op: ended[op] for op in every if ended[op]["status"] != "completed"}
            assert not failed, f"operations did not complete: {failed}"
            # The skew took part: some volume's operations ran on both clocks.
            clocks = [{ended[op].get("clock") for op in lane} for lane in lanes]
            assert any(c == {"host-a", "host-b"} for c in clocks), clocks

            # Every event carries its operation's place (its command's stream sequence),
            # increasing along each volume's commands; a rejected command's too.
            seqs = [[ended[op].get("seq") for op in lane] for lane in lanes]
            assert all(a < b < c for a, b, c in seqs), seqs
            bad = await send(f"{run}-bad", "attach", {"volume_id": volumes[0]})  # no vm_id
            await wait_for(lambda: bad in ended, timeout=15, interval=0.1)
            assert ended[bad]["status"] == "rejected"
            assert ended[bad].get("seq", 0) > max(max(lane) for lane in seqs)

            want = {
                volumes[i]: (lane[2], ended[lane[2]]["device_path"]) for i, lane in enumerate(lanes)
            }
            got: dict[str, Any] = {}

            async def rows_right() -> bool:
                nonlocal got
                rows = await database.query(
                    "SELECT volume_id, operation_id, device_path FROM device_mappings"
                )
                got = {r["volume_id"]: (r["operation_id"], r["device_path"]) for r in rows}
                return got == want

            # The rows may lag the events by a batch: a short wait, then the verdict.
            with contextlib.suppress(AssertionError):
                await wait_for(rows_right, timeout=15, interval=0.2)
            assert got == want, f"clocks per volume: {clocks}"
        finally:
            await bus.close()
            await b.stop()
            await a.stop()


async def _executors_beat(bus: Bus, n: int) -> bool:
    try:
        keys = await (await bus.js.key_value("volumed_health")).keys()
    except Exception:  # not provisioned yet, or empty
        return False
    return sum(1 for k in keys if k.startswith("executor.")) >= n
