"""``python -m simulator`` (and ``volumed simulator``): run the simulator as a process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

import msgspec

from simulator.config import GuestConfig, SimConfig, load_config
from simulator.hotplug import BUSES
from simulator.server import Simulator

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simulator",
        description="A CloudStack API simulator. When ready it prints one JSON line with "
        "endpoint, key and secret on stdout; SIGTERM or SIGINT stops it.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 0: ephemeral)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with SimConfig keys")
    p.add_argument("--seed", type=int, help="seed of the generated ids and keys")
    p.add_argument("--sysfs", metavar="DIR", help="fake sysfs root for hot-plugged devices")
    p.add_argument("--dev", metavar="DIR", help="fake /dev root for hot-plugged devices")
    p.add_argument(
        "--serials",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="give hot-plugged devices serials (default: on)",
    )
    p.add_argument(
        "--bus",
        choices=BUSES,
        help="the bus hot-plugged devices are on, with its sysfs and /dev layout (default "
        "virtio-blk; virtio-scsi: sdX, serial in VPD page 0x80; nvme: nvmeCn1, the "
        "controller's serial; xen: xvdX, no serial)",
    )
    p.add_argument("--job-latency", type=float, metavar="S", help="seconds jobs stay pending")
    p.add_argument("--hotplug-delay", type=float, metavar="S")
    p.add_argument("--unplug-delay", type=float, metavar="S")
    p.add_argument("--local-vm", metavar="ID", help="id of the VM devices are hot-plugged into")
    p.add_argument(
        "--guest",
        action="append",
        type=_guest,
        metavar="VM_ID:SYSFS:DEV",
        help="one more VM with its own fake sysfs and /dev trees (repeatable; an empty VM_ID: "
        "the first VM no earlier guest is; --sysfs/--dev/--local-vm make the first guest)",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def _guest(value: str) -> GuestConfig:
    """VM_ID:SYSFS:DEV (the VM id holds no colon; an empty part: None)."""
    parts = value.split(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{value!r} is not VM_ID:SYSFS:DEV")
    vm_id, sysfs, dev = (part or None for part in parts)
    return GuestConfig(vm_id=vm_id, sysfs_root=sysfs, dev_root=dev)


def build_config(args: argparse.Namespace) -> SimConfig:
    """The config file's values, overridden by the flags given."""
    overrides = {
        "host": args.host,
        "port": args.port,
        "seed": args.seed,
        "sysfs_root": args.sysfs,
        "dev_root": args.dev,
        "serials": args.serials,
        "bus": args.bus,
        "job_latency": args.job_latency,
        "hotplug_delay": args.hotplug_delay,
        "unplug_delay": args.unplug_delay,
        "local_vm_id": args.local_vm,
        # The flags' guests replace a config file's.
        "guests": msgspec.to_builtins(args.guest) if args.guest else None,
    }
    if args.config:
        return load_config(args.config, **overrides)
    return msgspec.convert({k: v for k, v in overrides.items() if v is not None}, SimConfig)


def ready_line(sim: Simulator) -> str:
    """The JSON line printed when the simulator listens (test config: it holds the secret)."""
    return json.dumps(
        {
            "endpoint": sim.url,
            "key": sim.api_key,
            "secret": sim.secret_key,
            "control": sim.control_url,
            "zone_id": sim.zone_id,
            "disk_offering_ids": sim.disk_offering_ids,
            "vm_ids": sim.vm_ids,
            "local_vm_id": sim.local_vm_id,
            "guests": sim.guest_views(),
        }
    )


async def serve(config: SimConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Simulator(config) as sim:
            sys.stdout.write(ready_line(sim) + "\n")
            sys.stdout.flush()
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 after SIGTERM/SIGINT, 2 on bad config)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = build_config(args)
    except (OSError, ValueError, msgspec.ValidationError) as e:
        print(f"simulator: bad configuration: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except ValueError as e:
        print(f"simulator: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"simulator: cannot listen: {e}", file=sys.stderr)
        return 1
    return 0
