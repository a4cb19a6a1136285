"""Attach correlation overhead: from the device event on the bus to the completed attach.

`volumed run` (all four actors) as a process, the simulator as a process hot-plugging fake
devices (with serials) into a temporary sysfs/dev tree, rescans every 20 ms. For each attach
to the local VM: the time from the watcher's `added` event for the volume's device reaching
the bus to the attach's `completed` event — what the correlator and the executor add once
the device is visible. Detection itself is measured by bench_detection.

    python -m bench.bench_correlation [--attaches 60] [--concurrency 4] [--bus virtio-scsi]
        [--hotplug-delay 0.5]

``--bus`` hot-plugs the disks on another bus, laid out as the kernel shows it (virtio-scsi:
the serial in VPD page 0x80; nvme: the controller's serial; xen: none, so attaches take the
serial-less path, one at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    database_name,
    drop_database,
    figure,
    nats_server,
    percentile,
    simulator,
    volumed_env,
)
from bench.common import volumed as volumed_process
from bus import Bus
from bus.topology import TOPOLOGY, device_subject
from schemas.common import GIB, serial_of
from simulator.hotplug import BUSES


async def run(args: argparse.Namespace, nats_url: str, sim: dict[str, Any]) -> None:
    bus = await Bus.connect(nats_url, "bench")
    await bus.provision(TOPOLOGY)
    vm = str(sim["local_vm_id"])
    device_seen: dict[str, float] = {}  # serial -> arrival of its `added` event
    done: dict[str, asyncio.Future[dict[str, object]]] = {}
    done_at: dict[str, float] = {}

    async def on_device(msg) -> None:  # type: ignore[no-untyped-def]
        event = json.loads(msg.data)
        if event["kind"] == "added" and event["device"].get("serial"):
            device_seen.setdefault(event["device"]["serial"], time.perf_counter())

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        event = json.loads(msg.data)
        if event["status"] in ("completed", "failed", "rejected", "cancelled"):
            done_at.setdefault(event["operation_id"], time.perf_counter())
            fut = done.get(event["operation_id"])
            if fut and not fut.done():
                fut.set_result(event)

    await bus.nc.subscribe(device_subject(vm), cb=on_device)
    await bus.nc.subscribe("volume.events.>", cb=on_event)

    async def command(op_type: str, body: dict[str, object]) -> tuple[str, dict[str, object]]:
        op_id = f"c-{uuid.uuid4().hex[:16]}"
        done[op_id] = asyncio.get_running_loop().create_future()
        await bus.publish(f"volume.cmd.{op_type}", {**body, "operation_id": op_id})
        return op_id, await asyncio.wait_for(done[op_id], 120)

    gate = asyncio.Semaphore(args.concurrency)
    overheads: list[float] = []
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        async with gate:
            _, created = await command(
                "create",
                {
                    "name": f"corr-{n}",
                    "size": GIB,
                    "zone_id": sim["zone_id"],
                    "disk_offering_id": sim["disk_offering_ids"][0],
                },
            )
            volume = str(created["volume_id"])
            op_id, attached = await command("attach", {"volume_id": volume, "vm_id": vm})
            if attached["status"] != "completed":
                failures += 1
                return
            seen = device_seen.get(serial_of(volume))
            if seen is not None:
                overheads.append(1000 * (done_at[op_id] - seen))
            await command("detach", {"volume_id": volume})
            await command("delete", {"volume_id": volume})

    # Warm-up: one full round before measuring.
    await one(-1)
    overheads.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(args.attaches)))
    figure("correlation_wall", time.perf_counter() - started, "s")
    figure("correlation_attaches", len(overheads), "attaches")
    figure("correlation_failed", failures, "attaches")
    figure("correlation_overhead_p50", percentile(overheads, 50), "ms")
    figure("correlation_overhead_p99", percentile(overheads, 99), "ms")
    await bus.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attaches", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bus", choices=BUSES, default="virtio-blk")
    parser.add_argument("--hotplug-delay", type=float, default=0.0, metavar="S")
    args = parser.parse_args()
    db = database_name()
    with tempfile.TemporaryDirectory() as tmp:
        sysfs, dev = Path(tmp, "sys"), Path(tmp, "dev")
        (sysfs / "block").mkdir(parents=True)
        (dev / "disk" / "by-id").mkdir(parents=True)
        with (
            nats_server() as nats_url,
            simulator(
                *("--seed", "9", "--sysfs", str(sysfs), "--dev", str(dev), "--serials"),
                *("--bus", args.bus, "--hotplug-delay", str(args.hotplug_delay)),
            ) as sim,
        ):
            env = volumed_env(
                nats_url,
                db,
                sim,
                VOLUMED_SYSFS=str(sysfs),
                VOLUMED_DEV=str(dev),
                VOLUMED_DEVICES="vd*,sd*,nvme*n*,xvd*",
                VOLUMED_POLL_INTERVAL="0.02",
            )
            try:
                with volumed_process(env):
                    await run(args, nats_url, sim)
            finally:
                drop_database(db)


if __name__ == "__main__":
    asyncio.run(main())
