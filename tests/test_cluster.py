"""volumed on a 3-node NATS cluster started from deploy/nats/cluster-loopback.conf: the
server leading the command stream is killed -9 while commands keep coming, and every
operation still ends once, completed, with its database row; the killed node comes back and
catches up. Also: every server configuration in the repository syncs before it acknowledges."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from bus.topology import COMMANDS, DEAD_LETTERS, EVENTS, EVENTS_PREFIX, TOPOLOGY
from simulator import Simulator
from tests.conftest import (
    Database,
    Harness,
    NatsServer,
    free_port,
    nats_server_binary,
    start_volumed,
    stop_volumed,
    wait_for,
)
from tests.test_lifecycle import create_body, op, settings_for, sim  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ROOT / "deploy" / "nats" / "cluster-loopback.conf"
# The configurations this repository's own tests can start (ports from the environment).
STARTABLE_CONFIGS = [ROOT / "nats.conf", *sorted((ROOT / "deploy" / "nats").glob("*.conf"))]
# Every stream volumed makes, its buckets' included.
STREAMS = [s.name for s in TOPOLOGY.streams] + [f"KV_{b.name}" for b in TOPOLOGY.buckets]
TERMINAL = {"completed", "failed", "cancelled", "rejected"}
FORWARD = ["pending", "executing", "completed"]


@dataclass
class ClusterNode(NatsServer):
    """One node of the loopback cluster: the repository's config, ports from the environment
    it reads them from."""

    name: str = "n1"
    cluster_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    routes: tuple[int, ...] = ()
    """Every node's cluster port."""

    def command(self) -> list[str]:
        return [self.binary, "-c", str(LOOPBACK)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **loopback_env(self)}

    def monitor(self, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (/jsz, /healthz, ...)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]


def loopback_env(node: ClusterNode) -> dict[str, str]:
    routes = ", ".join(f"nats://127.0.0.1:{p}" for p in node.routes)
    return {
        "NATS_NAME": node.name,
        "NATS_PORT": str(node.port),
        "NATS_HTTP_PORT": str(node.http_port),
        "NATS_CLUSTER_PORT": str(node.cluster_port),
        "NATS_ROUTES": f"[{routes}]",
        "NATS_STORE_DIR": str(node.store_dir),
    }


def cluster_formed(nodes: list[ClusterNode]) -> bool:
    """Every running node sees a JetStream meta leader and all its peers, and is healthy."""
    for node in nodes:
        try:
            meta = node.monitor("/jsz").get("meta_cluster") or {}
            healthy = node.monitor("/healthz").get("status") == "ok"
        except OSError:
            return False
        if not healthy or not meta.get("leader") or meta.get("cluster_size") != len(nodes):
            return False
    return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ClusterNode]]:
    cluster_ports = tuple(free_port() for _ in range(3))
    nodes = [
        ClusterNode(
            store_dir=tmp_path / f"n{i}", name=f"n{i}", cluster_port=port, routes=cluster_ports
        )
        for i, port in enumerate(cluster_ports, 1)
    ]
    try:
        for node in nodes:
            node.start()
        asyncio.run(wait_for(lambda: cluster_formed(nodes), timeout=60, interval=0.2))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def send_until_acknowledged(v: Harness, op_type: str, body: dict[str, object]) -> None:
    """Publish a command until the stream acknowledges it, as a client must: during a leader
    election a publish may time out or find nobody to answer. The operation id makes a
    re-sent command harmless (and Nats-Msg-Id lets the stream drop the copy)."""
    data = json.dumps(body).encode()
    headers = {"Nats-Msg-Id": str(body["operation_id"])}

    async def attempt() -> bool:
        try:
            await v.bus.js.publish(f"volume.cmd.{op_type}", data, headers=headers, timeout=2)  # type: ignore[attr-defined]
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    await wait_for(attempt, timeout=90, interval=0.2)


async def stream_leader(v: Harness, stream: str) -> str:
    async def leader() -> str | None:
        try:
            info = await v.bus.js.stream_info(stream)  # type: ignore[attr-defined]
        except (nats.errors.Error, TimeoutError):
            return None
        return info.cluster.leader if info.cluster else None

    return await wait_for(leader, timeout=60, interval=0.2)  # type: ignore[no-any-return]


async def stored_ends(v: Harness, op_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Each operation's latest event as the event stream holds it, once every one is
    terminal. (Not the harness's live subscription: a core subscription misses what is
    published while its connection moves to another server.)"""
    ends: dict[str, dict[str, Any]] = {}

    async def all_ended() -> bool:
        for op_id in op_ids:
            if op_id in ends:
                continue
            try:
                data = await v.bus.last_message(EVENTS.name, f"{EVENTS_PREFIX}.{op_id}")  # type: ignore[attr-defined]
            except (nats.errors.Error, TimeoutError):
                return False
            event = json.loads(data) if data else None
            if event is None or event["status"] not in TERMINAL:
                return False
            ends[op_id] = event
        return True

    await wait_for(all_ended, timeout=timeout, interval=0.2)
    return ends


async def stored_statuses(v: Harness) -> dict[str, list[str]]:
    """Every operation's statuses, in the order the event stream holds them."""
    statuses: dict[str, list[str]] = {}
    for seq in range(1, await v.bus.last_sequence(EVENTS.name) + 1):  # type: ignore[attr-defined]
        stored = await v.bus.stored(EVENTS.name, seq)  # type: ignore[attr-defined]
        if stored is not None:
            event = json.loads(stored.data)
            statuses.setdefault(event["operation_id"], []).append(event["status"])
    return statuses


async def caught_up(v: Harness, node: ClusterNode) -> bool:
    """Every volumed stream and bucket has all its replicas current, ``node`` among them."""
    for stream in STREAMS:
        try:
            info = await v.bus.js.stream_info(stream)  # type: ignore[attr-defined]
        except (nats.errors.Error, TimeoutError):
            return False
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            return False
        peers = {cluster.leader: True} | {r.name: bool(r.current) for r in cluster.replicas or []}
        if node.name not in peers or not all(peers.values()) or len(peers) != 3:
            return False
    return True


async def test_volumed_rides_out_the_loss_of_the_command_stream_leader(
    cluster: list[ClusterNode],
    database: Database,
    sim: Simulator,  # noqa: F811
) -> None:
    for node in cluster:
        assert node.monitor("/jsz")["config"]["sync_always"] is True
    settings = settings_for(
        cluster[0],
        database,
        sim,
        nats_url=",".join(node.url for node in cluster),
        stream_replicas=3,
        cloudstack_retry_budget=60.0,
    )
    v, task = await start_volumed(settings, ["persistence", "executor"], sim)
    try:
        for stream in STREAMS:
            info = await v.bus.js.stream_info(stream)  # type: ignore[attr-defined]
            assert info.config.num_replicas == 3, stream

        # Before: a few volumes, completed through the cluster.
        before = [op() for _ in range(4)]
        for op_id in before:
            await send_until_acknowledged(v, "create", create_body(sim, op_id, f"before-{op_id}"))
        volumes = [e["volume_id"] for e in (await stored_ends(v, before, 60)).values()]

        # Commands keep coming (creates, and deletes of the volumes made before) while the
        # server leading the command stream is killed -9 after the first few.
        during = [op() for _ in range(16)]
        commands: list[tuple[str, str, dict[str, object]]] = []
        for n, op_id in enumerate(during):
            if n % 4 == 3:
                volume_id = volumes[n // 4]
                commands.append((op_id, "delete", {"operation_id": op_id, "volume_id": volume_id}))
            else:
                commands.append((op_id, "create", create_body(sim, op_id, f"during-{op_id}")))
        sent = asyncio.Event()

        async def keep_sending() -> None:
            for n, (_, op_type, body) in enumerate(commands):
                await send_until_acknowledged(v, op_type, body)
                if n == 3:
                    sent.set()
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(keep_sending())
        await asyncio.wait_for(sent.wait(), 90)
        leader_name = await stream_leader(v, COMMANDS.name)
        leader = next(node for node in cluster if node.name == leader_name)
        leader.kill()
        await asyncio.wait_for(sender, 180)
        ended = await stored_ends(v, before + during, 180)

        # Every operation went pending, executing, completed and never otherwise, nor back
        # (a redelivered command may publish its latest event again, never an older one).
        statuses = await stored_statuses(v)
        for op_id in before + during:
            seen = statuses[op_id]
            assert set(seen) == set(FORWARD), seen
            assert seen == sorted(seen, key=FORWARD.index), seen
        # Exactly once in CloudStack: one volume per create, each delete done once.
        created = [c for c in sim.calls if c.command == "createVolume"]
        deleted = [c for c in sim.calls if c.command == "deleteVolume"]
        assert len(created) == len(before) + 12, created
        assert len(deleted) == 4, deleted
        for op_id, op_type, _ in commands:
            volume_id = str(ended[op_id]["volume_id"])
            assert (volume_id in sim.volumes) == (op_type == "create"), (op_id, op_type)
        # Nothing given up on or dead-lettered.
        assert await v.bus.last_sequence(DEAD_LETTERS.name) == 0  # type: ignore[attr-defined]
        # No event lost: the database holds every operation, completed, with its volume.
        for op_id in before + during:
            row = await v.row(database, op_id, "completed", timeout=60)
            assert row["volume_id"] == ended[op_id]["volume_id"], (row, ended[op_id])

        # The killed node comes back, catches up on every stream, and the cluster serves.
        leader.start()
        await wait_for(lambda: caught_up(v, leader), timeout=120, interval=0.5)
        after = op()
        await send_until_acknowledged(v, "create", create_body(sim, after, "after"))
        assert (await stored_ends(v, [after], 60))[after]["status"] == "completed"
        await v.row(database, after, "completed", timeout=60)
    finally:
        await stop_volumed(v, task)


def test_every_server_config_syncs_before_acknowledging() -> None:
    """`sync_interval: always` in every nats-server configuration with a JetStream block."""
    configs = [ROOT / "nats.conf", *sorted((ROOT / "deploy").rglob("*.conf"))]
    with_jetstream = [c for c in configs if re.search(r"^jetstream\s*\{", c.read_text(), re.M)]
    assert set(STARTABLE_CONFIGS) <= set(with_jetstream)
    for config in with_jetstream:
        assert re.search(r"^\s*sync_interval:\s*always\s*$", config.read_text(), re.M), config


@pytest.mark.parametrize("config", STARTABLE_CONFIGS, ids=lambda p: p.name)
def test_server_config_is_accepted(config: Path, tmp_path: Path) -> None:
    """nats-server (2.10+) accepts the file, sync_interval included."""
    node = ClusterNode(store_dir=tmp_path / "store", routes=(free_port(),))
    check = subprocess.run(
        [nats_server_binary(), "-c", str(config), "-t"],
        env=node.environment(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


async def test_raising_the_replicas_raises_the_buckets_too(cluster: list[ClusterNode]) -> None:
    """A volumed first provisioned with one replica, restarted with three: its buckets (KV
    streams) follow the setting like its other streams, so losing a node loses no record."""
    from bus import Bus

    bus = await Bus.connect(",".join(n.url for n in cluster), "test-replicas")
    try:
        await bus.provision(TOPOLOGY, replicas=1)
        await bus.provision(TOPOLOGY, replicas=3)
        for stream in STREAMS:
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
    finally:
        await bus.close()
