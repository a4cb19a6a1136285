"""volumed past one machine (deploy/): TLS with client certificates, one least-privilege
NATS user per actor (deploy/nats-accounts/accounts.conf, used as shipped) and the systemd
units. Certificates are made with openssl (deploy/tls/make-certs.sh) in the test's tmp
dir; nothing secret is committed or logged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from actors.supervisor import Supervisor, connect_bus
from bus import Bus
from bus.topology import CREATES_SUBJECT, TOPOLOGY
from client import Client, Unauthorized
from schemas.common import GIB
from schemas.config import ConfigError, Settings, load_nats_settings, load_settings
from schemas.internal import CreatesInDoubt, CreatesQuery
from simulator import SimConfig, Simulator
from tests.conftest import (
    Database,
    Harness,
    NatsServer,
    VolumedProcess,
    volumed_env,
    wait_for,
)
from tests.test_cli import VOLUMED, create_args
from tests.test_devices_e2e import fake_tree, hotplugging
from tests.test_lifecycle import create_body, op, remote_vm, settings_for

REPO = Path(__file__).resolve().parent.parent
ACCOUNTS = REPO / "deploy" / "nats-accounts" / "accounts.conf"
ROLES = (
    "client",
    "executor",
    "persistence",
    "watcher",
    "correlator",
    "gateway",
    "operator",
    "admin",
)
MAKE_CERTS = REPO / "deploy" / "tls" / "make-certs.sh"
OPENSSL = shutil.which("openssl")


def make_certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate "volumed", made by
    the shipped example (deploy/tls/make-certs.sh)."""
    subprocess.run(["sh", str(MAKE_CERTS), str(d)], check=True, capture_output=True)


@dataclass
class SecureNats(NatsServer):
    """A nats-server with a configuration file in ``store_dir``: volumed's accounts (or
    ``config``), optionally TLS. Started and stopped as any NatsServer."""

    tls: bool = False
    config: str = "include ./accounts.conf"
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.store_dir

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "nats-server.log"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.dir / "server.conf")]

    def environment(self) -> dict[str, str]:
        env = {**os.environ}
        env.update({f"VOLUMED_{r.upper()}_PASSWORD": p for r, p in self.passwords.items()})
        return env

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(ACCOUNTS, self.dir / "accounts.conf")
        tls = ""
        if self.tls:
            c = self.dir / "certs"
            tls = (
                f'tls {{ cert_file: "{c}/server.pem", key_file: "{c}/server.key", '
                f'ca_file: "{c}/ca.pem", verify: true, timeout: 2 }}'
            )
        (self.dir / "server.conf").write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            f'log_file: "{self.log}"\n'
            f"{tls}\n{self.config}\n"
        )
        self.passwords = {role: f"pw-{role}-{os.urandom(6).hex()}" for role in ROLES}
        super().start()

    def violations(self) -> list[str]:
        """The server's permission violations so far (it logs each one)."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if "Violation" in line]


def _running(server: SecureNats) -> Iterator[SecureNats]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def accounts_server(tmp_path: Path) -> Iterator[SecureNats]:
    yield from _running(SecureNats(tmp_path / "nats"))


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[SecureNats]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    make_certificates(tmp_path / "nats" / "certs")
    yield from _running(SecureNats(tmp_path / "nats", tls=True))


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as s:
        yield s


def as_user(settings: Settings, server: SecureNats, role: str, **over: object) -> Settings:
    """``settings`` logging in as ``role``; only admin provisions."""
    fields = {
        **{k: getattr(settings, k) for k in Settings.__struct_fields__},
        "nats_user": role,
        "nats_password": server.passwords[role],
        "nats_provision": role == "admin",
        "instance": role,
    }
    fields.update(over)
    return Settings(**fields)


async def run_supervisor(
    settings: Settings, actors: list[str]
) -> tuple[Supervisor, asyncio.Task[None]]:
    supervisor = Supervisor(settings, actors)
    task = asyncio.create_task(supervisor.run())
    ready = asyncio.create_task(supervisor.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()
    assert supervisor.ready.is_set(), "volumed did not start"
    return supervisor, task


async def stop_supervisor(supervisor: Supervisor, task: asyncio.Task[None]) -> None:
    supervisor.stop()
    await asyncio.wait_for(task, 30)


async def user_of(settings: Settings, sim: Simulator, supervisor: Supervisor) -> Harness:
    """A user (the test) with its own connection, collecting every event."""
    bus = await connect_bus(settings, "test-user")
    harness = Harness(bus=bus, sim=sim, settings=settings, supervisor=supervisor)

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        event = json.loads(msg.data)
        harness.events.setdefault(event["operation_id"], []).append(event)

    await bus.nc.subscribe("volume.events.>", cb=on_event)
    await bus.flush()
    return harness


async def create_one(volumed: Settings, client: Settings, sim: Simulator) -> None:
    """executor and persistence with ``volumed``'s settings, a user with ``client``'s: one
    create completes."""
    supervisor, task = await run_supervisor(volumed, ["persistence", "executor"])
    user = await user_of(client, sim, supervisor)
    try:
        c = op()
        await user.send("create", create_body(sim, c))
        assert (await user.terminal(c, timeout=30))["status"] == "completed"
    finally:
        await user.bus.close()  # type: ignore[attr-defined]
        await stop_supervisor(supervisor, task)


async def lifecycle(v: Harness, sim: Simulator, timeout: float = 30) -> None:
    """create, attach to another VM, a query, detach, delete: each completes."""
    c, a, d, x = op(), op(), op(), op()
    await v.send("create", create_body(sim, c, "secure-1"))
    created = await v.terminal(c, timeout=timeout)
    assert created["status"] == "completed", created
    volume_id = created["volume_id"]
    await v.send("attach", {"operation_id": a, "volume_id": volume_id, "vm_id": remote_vm(sim)})
    assert (await v.terminal(a, timeout=30))["status"] == "completed"
    answer, code = await v.query("operation", {"operation_id": a})
    assert code is None and answer["status"] == "completed", answer
    mapping, code = await v.query("mapping", {"volume_id": volume_id})
    assert code is None and mapping["vm_id"] == remote_vm(sim), mapping
    await v.send("detach", {"operation_id": d, "volume_id": volume_id})
    assert (await v.terminal(d, timeout=30))["status"] == "completed"
    await v.send("delete", {"operation_id": x, "volume_id": volume_id})
    assert (await v.terminal(x, timeout=30))["status"] == "completed"


# -- settings ---------------------------------------------------------------------------


def test_nats_password_is_a_masked_secret() -> None:
    settings = load_settings(
        environ={"VOLUMED_NATS_USER": "executor", "VOLUMED_NATS_PASSWORD": "s3cr3t-Pw"}
    )
    assert settings.nats_user == "executor" and settings.nats_password == "s3cr3t-Pw"
    assert "s3cr3t-Pw" not in repr(settings) and "s3cr3t-Pw" in settings.secrets()
    assert settings.redacted()["nats_password"] == "***"
    assert load_settings(environ={"VOLUMED_NATS_PROVISION": "false"}).nats_provision is False


@pytest.mark.parametrize(
    "environ",
    [
        {"VOLUMED_NATS_TLS_CERT": "/c.pem"},
        {"VOLUMED_NATS_PASSWORD": "s3cr3t-Pw"},
        {"VOLUMED_NATS_USER": "u", "VOLUMED_NATS_CREDS": "/u.creds"},
        {"VOLUMED_NATS_TLS_CA": "/nonexistent/ca.pem"},
        {"VOLUMED_NATS_CREDS": "/nonexistent/u.creds"},
    ],
)
def test_nats_settings_that_go_together(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(environ=environ)
    assert "VOLUMED_NATS_" in str(e.value) and "s3cr3t-Pw" not in str(e.value)


def test_a_client_reads_only_the_nats_settings() -> None:
    """The user commands take the daemon's NATS variables, checked as the daemon checks
    them, and nothing else: a daemon setting they never use cannot stop them."""
    settings = load_nats_settings(
        {"VOLUMED_NATS_USER": "client", "VOLUMED_POLL_INTERVAL": "soon", "VOLUMED_VM_ID": "x"}
    )
    assert settings.nats_user == "client" and settings.vm_id is None
    assert settings.inbox_prefix == "_INBOX.client"
    with pytest.raises(ConfigError, match="VOLUMED_NATS_TLS_KEY"):
        load_nats_settings({"VOLUMED_NATS_TLS_CERT": "/c.pem"})


# -- TLS --------------------------------------------------------------------------------


async def test_operation_over_tls_with_client_certificates(
    tls_server: SecureNats, database: Database, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    certs = tls_server.dir / "certs"
    tls = {
        "nats_tls_ca": str(certs / "ca.pem"),
        "nats_tls_cert": str(certs / "volumed.pem"),
        "nats_tls_key": str(certs / "volumed.key"),
    }
    base = settings_for(tls_server, database, sim)  # type: ignore[arg-type]
    admin = as_user(base, tls_server, "admin", **tls)
    await create_one(admin, as_user(base, tls_server, "client", **tls), sim)

    # Without its certificate, a client is refused, and the log says why.
    caplog.set_level(logging.WARNING, logger="volumed.bus")
    no_cert = as_user(base, tls_server, "executor", nats_tls_ca=tls["nats_tls_ca"])
    refused = Supervisor(no_cert, ["executor"])
    running = asyncio.create_task(refused.run())
    try:
        # TLS 1.3: the server's alert comes after the client's handshake, as an error.
        await wait_for(lambda: "certificate required" in caplog.text, timeout=30)
        assert not refused.ready.is_set()
    finally:
        refused.stop()
        await asyncio.wait_for(running, 30)
    assert not any(p in caplog.text for p in tls_server.passwords.values())


# -- least-privilege users --------------------------------------------------------------


async def test_each_actor_runs_with_only_its_own_user(
    accounts_server: SecureNats, database: Database, tmp_path: Path
) -> None:
    """Four processes' worth of actors, each logged in as its own user: the remote-VM
    lifecycle, a local attach (watcher, correlator, proofs), queries and health all work,
    and the server saw no permission violation at all."""
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=5, serials=True)) as sim:
        base = settings_for(
            accounts_server,  # type: ignore[arg-type]
            database,
            sim,
            sysfs=str(sysfs),
            dev=str(dev),
            devices=("vd*",),
            poll_interval=0.05,
            heartbeat_interval=0.2,
            metrics_addr="127.0.0.1:0",  # /metrics needs its own read grants: proven too
        )
        await provision_as_admin(accounts_server)
        running = []
        try:
            for actor in ("persistence", "executor", "watcher", "correlator"):
                settings = as_user(base, accounts_server, actor)
                running.append(await run_supervisor(settings, [actor]))
            user = await user_of(as_user(base, accounts_server, "client"), sim, running[0][0])
            try:
                await lifecycle(user, sim)
                await local_attach_and_detach(user, sim)
                await wait_for(healthy(user), timeout=30)
                for supervisor, _ in running:
                    assert "volumed_server_metrics_up 1.0" in await scrape(supervisor)
                # A lost createVolume answer's look-up asks persistence (rare: asked here).
                executor = await login(accounts_server, "executor")
                try:
                    query = CreatesQuery(
                        operation_id="op-1", name="x", size=GIB, zone_id="z", disk_offering_id="o"
                    )
                    answer = await executor.request(CREATES_SUBJECT, query)
                    assert msgspec.json.decode(answer, type=CreatesInDoubt) == CreatesInDoubt()
                finally:
                    await executor.close()
            finally:
                await user.bus.close()  # type: ignore[attr-defined]
        finally:
            for supervisor, task in reversed(running):
                await stop_supervisor(supervisor, task)
    assert accounts_server.violations() == []


async def test_each_actor_as_its_own_process_and_user(
    accounts_server: SecureNats, database: Database, tmp_path: Path
) -> None:
    """`volumed run <actor>` as four processes configured from the environment, each with
    its own user: the lifecycle works, each exits 0 on SIGTERM, no password is logged and
    the server saw no permission violation."""
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=7, serials=True)) as sim:
        await provision_as_admin(accounts_server)
        processes = []
        for actor in ("persistence", "executor", "watcher", "correlator"):
            env = volumed_env(
                accounts_server.url,
                database.dsn,
                sim,
                VOLUMED_NATS_USER=actor,
                VOLUMED_NATS_PASSWORD=accounts_server.passwords[actor],
                VOLUMED_NATS_PROVISION="false",
                VOLUMED_SYSFS=str(sysfs),
                VOLUMED_DEV=str(dev),
                VOLUMED_DEVICES="vd*",
                VOLUMED_POLL_INTERVAL="0.05",
                VOLUMED_HEARTBEAT_INTERVAL="0.2",
                VOLUMED_LOG_FORMAT="json",
            )
            process = VolumedProcess(env, (actor,), log_path=tmp_path / f"{actor}.log")
            await process.start()
            processes.append(process)
        base = settings_for(accounts_server, database, sim)  # type: ignore[arg-type]
        user = await user_of(as_user(base, accounts_server, "client"), sim, None)  # type: ignore[arg-type]
        try:
            # Ready when every actor's heartbeat is in (processes start at their own pace).
            await wait_for(healthy(user), timeout=60, interval=0.2)
            await lifecycle(user, sim, timeout=60)
            await local_attach_and_detach(user, sim)
        finally:
            await user.bus.close()  # type: ignore[attr-defined]
            codes = [await p.stop() for p in reversed(processes)]
    assert codes == [0, 0, 0, 0]
    logs = "".join(p.log_path.read_text() for p in processes if p.log_path)
    assert logs.count("nats_password='***'") == 4  # each process's settings line, masked
    assert not any(p in logs for p in accounts_server.passwords.values())
    assert accounts_server.violations() == []


def healthy(user: Harness) -> Callable[[], Awaitable[bool]]:
    """A predicate: the health query answers ok (every actor's heartbeat is fresh)."""

    async def ok() -> bool:
        try:
            health, _ = await user.query("health", {})
        except Exception:  # no responder yet: persistence is still starting
            return False
        return health.get("status") == "ok"

    return ok


async def scrape(supervisor: Supervisor) -> str:
    assert supervisor.metrics is not None
    url = f"http://127.0.0.1:{supervisor.metrics.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as reply:
        assert reply.status == 200
        return await reply.text()


async def provision_as_admin(server: SecureNats) -> None:
    """`volumed provision` as the admin user, as a process: exit 0, no password printed."""
    password = server.passwords["admin"]
    env = {"VOLUMED_NATS_URL": server.url, "VOLUMED_NATS_USER": "admin"}
    env |= {"VOLUMED_NATS_PASSWORD": password, "VOLUMED_LOG_FORMAT": "text"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "provision",
        env={**os.environ, **env},
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, output.decode()
    assert b"provisioned" in output and password.encode() not in output, output.decode()


async def local_attach_and_detach(v: Harness, sim: Simulator) -> None:
    c, a, d = op(), op(), op()
    await v.send("create", create_body(sim, c, "secure-local"))
    volume_id = (await v.terminal(c, timeout=30))["volume_id"]
    await v.send("attach", {"operation_id": a, "volume_id": volume_id, "vm_id": sim.local_vm_id})
    attached = await v.terminal(a, timeout=30)
    assert attached["status"] == "completed" and attached["device_path"], attached
    mapping, code = await v.query("mapping", {"volume_id": volume_id})
    assert code is None and mapping["device_path"] == attached["device_path"], mapping
    # A resize waits for the device's new size (the executor reads the device list).
    r = op()
    await v.send("resize", {"operation_id": r, "volume_id": volume_id, "size": 2 * GIB})
    resized = await v.terminal(r, timeout=30)
    assert resized["status"] == "completed" and resized["size"] == 2 * GIB, resized
    await v.send("detach", {"operation_id": d, "volume_id": volume_id})
    assert (await v.terminal(d, timeout=30))["status"] == "completed"


async def test_a_wrong_password_is_refused_and_never_logged(
    accounts_server: SecureNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="volumed.bus")
    wrong = f"wrong-{os.urandom(6).hex()}"
    settings = Settings(nats_url=accounts_server.url, nats_user="executor", nats_password=wrong)
    refused = Supervisor(settings, ["executor"])
    running = asyncio.create_task(refused.run())
    try:
        await wait_for(lambda: "authorization violation" in caplog.text.lower(), timeout=30)
        assert not refused.ready.is_set()
    finally:
        refused.stop()
        await asyncio.wait_for(running, 30)
    assert wrong not in caplog.text and wrong not in repr(settings)


def login(server: SecureNats, role: str, **over: object) -> Awaitable[Bus]:
    """A connection as ``role``, made as volumed makes its own (its inbox prefix too)."""
    settings = Settings(
        nats_url=server.url, nats_user=role, nats_password=server.passwords[role], **over
    )  # type: ignore[arg-type]
    return Bus.connect_with(settings, role)


async def test_a_refused_client_names_its_user_never_the_password(
    accounts_server: SecureNats,
) -> None:
    """The client gives up at the first refusal (the daemon would retry): Unauthorized, at
    once, naming the user, whether it came from the settings or from the URL."""
    wrong = f"wrong-{os.urandom(6).hex()}"
    with_user = Settings(nats_url=accounts_server.url, nats_user="client", nats_password=wrong)
    in_url = accounts_server.url.replace("nats://", f"nats://client:{wrong}@")
    for connecting in (
        Client.connect(settings=with_user, timeout=30),
        Client.connect(in_url, timeout=30),
    ):
        started = time.monotonic()
        with pytest.raises(Unauthorized) as refused:
            await connecting
        assert time.monotonic() - started < 5
        text = str(refused.value)
        assert "'client'" in text and "Authorization Violation" in text, text
        assert wrong not in text and accounts_server.passwords["client"] not in text


async def test_client_user_cannot_touch_internals(accounts_server: SecureNats) -> None:
    admin = await login(accounts_server, "admin")
    client = await login(accounts_server, "client")
    try:
        await admin.provision(TOPOLOGY)
        # Allowed: a command, answered by the command stream's acknowledgement.
        assert await client.publish("volume.cmd.create", b"{}") > 0
        # Denied: the server drops these; a request times out, the stream keeps its state.
        before = await admin.last_sequence("VOLUMED_DEVICES")
        with pytest.raises(Exception):  # noqa: B017 (nats-py raises its timeout)
            await client.publish("volumed.device.vm-1", b"{}")
        with pytest.raises(Exception):  # noqa: B017
            await client.js.delete_stream("VOLUMED_EVENTS")
        assert await admin.last_sequence("VOLUMED_DEVICES") == before
        assert (await admin.js.stream_info("VOLUMED_EVENTS")).config.name == "VOLUMED_EVENTS"
        await wait_for(lambda: "permissions violation" in client.last_error.lower())
    finally:
        await client.close()
        await admin.close()
    violations = accounts_server.violations()
    assert any("volumed.device.vm-1" in line for line in violations), violations
    assert any("STREAM.DELETE.VOLUMED_EVENTS" in line for line in violations), violations


async def test_operator_user_reads_and_changes_nothing(accounts_server: SecureNats) -> None:
    admin = await login(accounts_server, "admin")
    operator = await login(accounts_server, "operator")
    try:
        await admin.provision(TOPOLOGY)
        await admin.publish("volume.events.op-1", {"status": "pending"})
        # Reads: stream and consumer state, stored messages, KV entries.
        assert (await operator.js.stream_info("VOLUMED_EVENTS")).state.messages == 1
        assert await operator.last_message("VOLUMED_EVENTS", "volume.events.op-1")
        assert (await operator.js.consumer_info("VOLUMED_EVENTS", "persistence")).name
        await (await admin.js.key_value("volumed_health")).put("executor-1", b"{}")
        assert (await (await operator.js.key_value("volumed_health")).get("executor-1")).value
        assert await (await operator.js.key_value("volumed_health")).keys() == ["executor-1"]
        # Changes are refused (each request goes unanswered).
        for subject in (
            "volume.cmd.create",
            "$KV.volumed_operations.op-1",
            "$JS.API.STREAM.PURGE.VOLUMED_EVENTS",
            "$JS.API.STREAM.DELETE.VOLUMED_EVENTS",
            "$JS.API.CONSUMER.DELETE.VOLUMED_COMMANDS.executor",
            "$JS.API.CONSUMER.DURABLE.CREATE.VOLUMED_EVENTS.mine",
        ):
            with pytest.raises(Exception):  # noqa: B017 (nats-py raises its timeout)
                await operator.nc.request(subject, b"{}", timeout=1)
        assert (await admin.js.stream_info("VOLUMED_EVENTS")).state.messages == 1
        assert (await admin.js.consumer_info("VOLUMED_COMMANDS", "executor")).name
    finally:
        await operator.close()
        await admin.close()
    assert len(accounts_server.violations()) == 6, accounts_server.violations()


# -- inboxes: each role its own -----------------------------------------------------------


def test_inbox_prefix_follows_the_user() -> None:
    def prefix(**environ: str) -> str:
        variables = {f"VOLUMED_{k.upper()}": v for k, v in environ.items()}
        return load_settings(environ=variables).inbox_prefix

    assert prefix() == "_INBOX"  # no user: NATS's own
    assert prefix(nats_user="executor") == "_INBOX.executor"
    assert prefix(nats_url="nats://client:pw@10.0.0.5:4222") == "_INBOX.client"
    assert prefix(nats_user="executor", nats_inbox_prefix="_I.exec-1") == "_I.exec-1"
    # A user name that cannot be part of a subject asks for an explicit prefix.
    with pytest.raises(ConfigError) as e:
        prefix(nats_user="my user", nats_password="s3cr3t-Pw")
    assert "VOLUMED_NATS_INBOX_PREFIX" in str(e.value) and "s3cr3t-Pw" not in str(e.value)
    with pytest.raises(ConfigError):
        prefix(nats_inbox_prefix="_INBOX.*")


async def test_a_role_reads_only_its_own_inbox(accounts_server: SecureNats) -> None:
    """The client may subscribe to its own inbox prefix, never to the executor's or to all of
    _INBOX; a client that uses another prefix gets no replies and is told why."""
    admin = await login(accounts_server, "admin")
    client = await login(accounts_server, "client")
    got: list[str] = []

    async def collect(subject: str, data: bytes, reply: str | None) -> None:
        got.append(subject)

    try:
        assert client.nc.new_inbox().startswith("_INBOX.client.")
        for subject in ("_INBOX.client.>", "_INBOX.executor.>", "_INBOX.>"):
            await client.subscribe(subject, collect)
        await client.flush()  # the server has the SUBs (Bus.flush: a PING behind them)
        for subject in ("_INBOX.client.probe", "_INBOX.executor.probe", "_INBOX.probe"):
            await admin.publish_core(subject, b"secret reply")
        # One publisher's messages reach a subscriber in order: once this last one is in,
        # the two forbidden ones would have come before it if they were delivered at all.
        await admin.publish_core("_INBOX.client.last", b"last")
        await admin.flush()
        await wait_for(lambda: "_INBOX.client.last" in got)
        assert got == ["_INBOX.client.probe", "_INBOX.client.last"]
    finally:
        await client.close()
        await admin.close()
    denied = [line for line in accounts_server.violations() if "Subscription Violation" in line]
    assert len(denied) == 2, denied
    assert any('"_INBOX.executor.>"' in line for line in denied), denied
    assert any('"_INBOX.>"' in line for line in denied), denied

    # The client's user with NATS's default prefix: its replies are not allowed to reach it.
    settings = Settings(
        nats_url=accounts_server.url,
        nats_user="client",
        nats_password=accounts_server.passwords["client"],
        nats_inbox_prefix="_INBOX",
    )
    async with await Client.connect(settings=settings, request_timeout=1) as shared:
        with pytest.raises(Unauthorized) as refused:
            await shared.health()
    assert "permissions violation" in str(refused.value).lower(), refused.value
    assert accounts_server.passwords["client"] not in str(refused.value)


# -- the client and the `volumed` user commands on a secured NATS ----------------------------


async def user_command(
    env: dict[str, str], *args: str, timeout: float = 60
) -> tuple[int, str, str]:
    """`volumed ARGS` as a process with only ``env``'s NATS settings (none inherited)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VOLUMED_NATS_")}
    proc = await asyncio.create_subprocess_exec(
        VOLUMED,
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_as_the_client_user_over_tls(
    tls_server: SecureNats, database: Database, sim: Simulator
) -> None:
    """The `volumed` user commands as the least-privilege `client` user over TLS with a
    client certificate, configured as the daemon is: a create runs to its end; flags do
    the same as the variables; a wrong password or a missing certificate exits 4 with a
    clear message, no traceback and no password."""
    certs = tls_server.dir / "certs"
    tls = {
        "VOLUMED_NATS_TLS_CA": str(certs / "ca.pem"),
        "VOLUMED_NATS_TLS_CERT": str(certs / "volumed.pem"),
        "VOLUMED_NATS_TLS_KEY": str(certs / "volumed.key"),
    }
    password = tls_server.passwords["client"]
    env = {"VOLUMED_NATS_URL": tls_server.url, **tls, "VOLUMED_NATS_USER": "client"}
    env["VOLUMED_NATS_PASSWORD"] = password
    base = settings_for(tls_server, database, sim)  # type: ignore[arg-type]
    admin = as_user(base, tls_server, "admin", **{k[8:].lower(): v for k, v in tls.items()})
    supervisor, task = await run_supervisor(admin, ["persistence", "executor"])
    try:
        code, out, err = await user_command(env, *create_args(sim, "tls-1"), "--json")
        assert code == 0, err
        created = [json.loads(line) for line in out.splitlines()][-1]
        assert created["status"] == "completed" and created["volume_id"], created

        # The same settings as flags (the password stays in the environment).
        flags = ["--server", tls_server.url, "--user", "client"]
        flags += ["--tls-ca", tls["VOLUMED_NATS_TLS_CA"]]
        flags += ["--tls-cert", tls["VOLUMED_NATS_TLS_CERT"]]
        flags += ["--tls-key", tls["VOLUMED_NATS_TLS_KEY"]]
        only_password = {"VOLUMED_NATS_PASSWORD": password}
        code, out, err = await user_command(
            only_password, "status", created["operation_id"], "--json", *flags
        )
        assert code == 0 and json.loads(out)["status"] == "completed", err

        wrong = f"wrong-{os.urandom(6).hex()}"
        code, out, err = await user_command({**env, "VOLUMED_NATS_PASSWORD": wrong}, "health")
        assert code == 4, (out, err)
        assert "unauthorized" in err and "'client'" in err and "Traceback" not in err, err
        assert wrong not in out + err and password not in out + err
        code, out, _ = await user_command(
            {**env, "VOLUMED_NATS_PASSWORD": wrong}, "health", "--json"
        )
        assert code == 4 and json.loads(out)["error"]["code"] == "unauthorized", out

        # No client certificate: TLS fails, and it says so.
        client_pair = ("VOLUMED_NATS_TLS_CERT", "VOLUMED_NATS_TLS_KEY")
        no_cert = {k: v for k, v in env.items() if k not in client_pair}
        code, out, err = await user_command(no_cert, "health")
        assert code == 4 and "TLS" in err and "Traceback" not in err, err
        assert password not in out + err
        # A key without its certificate is a usage error, named.
        key_only = {**no_cert, "VOLUMED_NATS_TLS_KEY": tls["VOLUMED_NATS_TLS_KEY"]}
        code, _, err = await user_command(key_only, "health")
        assert code == 2 and "VOLUMED_NATS_TLS_CERT" in err, err
    finally:
        await stop_supervisor(supervisor, task)
    assert tls_server.violations() == []


# -- creds files (a server in JWT mode) -------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(signer: Any, subject: str, name: str, nats: dict[str, object]) -> str:
    """A NATS JWT (what `nsc` makes), signed with ``signer``'s NKey."""
    claims: dict[str, object] = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def jwt_mode_server(d: Path) -> tuple[SecureNats, Path]:
    """A nats-server trusting a fresh operator, with the account VOLUMED (JetStream on) and
    one user in it whose .creds file is returned."""
    import nkeys

    def key(prefix: int) -> Any:
        return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))

    operator, account, system = (key(nkeys.PREFIX_BYTE_OPERATOR), *(
        key(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(2)
    ))  # fmt: skip
    user = key(nkeys.PREFIX_BYTE_USER)
    unlimited = dict.fromkeys(("subs", "data", "payload", "imports", "exports", "conn"), -1)
    js = dict.fromkeys(("mem_storage", "disk_storage", "streams", "consumer"), -1)

    def account_jwt(a: Any, name: str, limits: dict[str, int]) -> str:
        return _jwt(operator, a.public_key.decode(), name, {"type": "account", "limits": limits})

    d.mkdir(parents=True, exist_ok=True)
    (d / "jwt.conf").write_text(
        f"operator: {_jwt(operator, operator.public_key.decode(), 'test', {'type': 'operator'})}\n"
        "resolver: MEMORY\n"
        f"system_account: {system.public_key.decode()}\n"
        "resolver_preload: {\n"
        f"  {account.public_key.decode()}: {account_jwt(account, 'VOLUMED', unlimited | js)}\n"
        f"  {system.public_key.decode()}: {account_jwt(system, 'SYS', unlimited)}\n"
        "}\n"
    )
    user_limits = dict.fromkeys(("subs", "data", "payload"), -1)
    user_jwt = _jwt(account, user.public_key.decode(), "volumed", {"type": "user", **user_limits})
    creds = d / "volumed.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return SecureNats(d, config="include ./jwt.conf"), creds


async def test_creds_file_login(tmp_path: Path, database: Database, sim: Simulator) -> None:
    server, creds = jwt_mode_server(tmp_path / "nats")
    for _ in _running(server):
        settings = settings_for(server, database, sim, nats_creds=str(creds))  # type: ignore[arg-type]
        await create_one(settings, settings, sim)


# -- systemd ----------------------------------------------------------------------------

UNITS = REPO / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def unit_settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_fit_each_actor() -> None:
    """The hardening follows what each actor touches: only the watcher (and the all-in-one
    unit) sees devices and opens netlink; only the admin user provisions."""
    for actor in ("executor", "persistence", "watcher", "correlator", "gateway"):
        unit = unit_settings(UNITS / f"volumed-{actor}.service")
        assert unit["ExecStart"] == [f"/opt/volumed/bin/volumed run {actor}"]
        assert unit["EnvironmentFile"][-1] == f"/etc/volumed/{actor}.env"
        assert "volumed-provision.service" in unit["After"][0]
        families = unit["RestrictAddressFamilies"][0].split()
        assert ("AF_NETLINK" in families) == (actor == "watcher")
        assert ("PrivateDevices" in unit) == (actor != "watcher")
        assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert unit_settings(UNITS / "volumed-provision.service")["EnvironmentFile"][-1] == (
        "/etc/volumed/admin.env"
    )


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    volumed = Path(sys.executable).with_name("volumed")
    probe = tmp_path / "probe.service"
    probe.write_text(f"[Service]\nType=oneshot\nExecStart={volumed} --help\n")
    if subprocess.run([ANALYZE, "verify", "--man=no", str(probe)], capture_output=True).returncode:
        pytest.skip("systemd-analyze verify cannot run here")
    units = []
    for unit in sorted(UNITS.glob("*.service")):
        # The executable must exist for verify: the venv's stands in for /opt/volumed's.
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/volumed/bin/volumed", str(volumed)))
        units.append(str(copy))
    assert len(units) == 7
    verify = subprocess.run([ANALYZE, "verify", "--man=no", *units], capture_output=True, text=True)
    # Unknown or misspelt keys are only warned about: any output fails the test.
    assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify.stderr
    security = subprocess.run(
        [ANALYZE, "security", "--offline=yes", *units], capture_output=True, text=True
    )
    levels = re.findall(r"Overall exposure level for (\S+): ([0-9.]+)", security.stdout)
    if not levels:
        return  # an older systemd without offline security analysis
    assert len(levels) == 7 and all(float(level) <= 2.0 for _, level in levels), levels
