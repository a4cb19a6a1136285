"""The `volumed` user commands, run as the installed `volumed` program in a child process,
against a real stack: nats-server, MariaDB, volumed in-process (executor and persistence)
and the CloudStack simulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.common import STATUS_RANK
from simulator import Fault, Simulator
from tests.conftest import Database, Harness, NatsServer, free_port, stop_volumed
from tests.test_devices_e2e import device_of_volume, fake_tree, hotplugging
from tests.test_devices_e2e import start as start_devices
from tests.test_lifecycle import create_body, remote_vm, sim, volumed  # noqa: F401  (fixtures)

VOLUMED = str(Path(sysconfig.get_path("scripts")) / "volumed")


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        """stdout as JSON lines: every line must parse."""
        return [json.loads(line) for line in self.out.splitlines()]


async def spawn(nats: NatsServer | None, *argv: str) -> asyncio.subprocess.Process:
    """Start ``argv`` with VOLUMED_NATS_URL naming ``nats`` (or nothing that listens)."""
    env = {**os.environ, "VOLUMED_NATS_URL": nats.url if nats else "nats://127.0.0.1:1"}
    return await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def volumed_cli(nats: NatsServer | None, *args: str, timeout: float = 60) -> Ran:
    """Run `volumed ARGS` against ``nats``; wait for it to end."""
    proc = await spawn(nats, VOLUMED, *args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def create_args(sim: Simulator, name: str = "vol") -> list[str]:  # noqa: F811
    return [
        "create",
        name,
        "--size",
        "2G",
        "--offering",
        sim.disk_offering_ids[0],
        "--zone",
        sim.zone_id,
    ]


async def test_json_lines_end_with_the_terminal_event(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    ran = await volumed_cli(nats_server, *create_args(sim, "data-1"), "--json")
    assert ran.code == 0, ran
    events = ran.lines()
    assert [e["status"] for e in events] == ["pending", "executing", "completed"]
    created = events[-1]
    volume_id = created["volume_id"]
    assert sim.volumes[volume_id].size == 2 * 1024**3

    vm = remote_vm(sim)
    ran = await volumed_cli(nats_server, "attach", volume_id, vm, "--op", "cli-attach-1", "--json")
    assert ran.code == 0, ran
    assert ran.lines()[-1]["operation_id"] == "cli-attach-1"
    assert ran.lines()[-1]["status"] == "completed"

    # The queries, for scripts: each reply is one JSON object.
    ran = await volumed_cli(nats_server, "mapping", "--volume", volume_id, "--json")
    assert ran.code == 0 and ran.lines()[0]["vm_id"] == vm
    ran = await volumed_cli(nats_server, "vm-volumes", vm, "--json")
    assert [m["volume_id"] for m in ran.lines()[0]["volumes"]] == [volume_id]
    ran = await volumed_cli(nats_server, "list", "--volume", volume_id, "--json")
    operations = ran.lines()[0]["operations"]  # newest first
    assert [o["operation_id"] for o in operations] == ["cli-attach-1", created["operation_id"]]
    ran = await volumed_cli(nats_server, "health", "--json")
    assert set(ran.lines()[0]["checks"]) >= {"nats", "database", "cloudstack"}


async def test_a_person_sees_progress_and_the_result(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    ran = await volumed_cli(nats_server, *create_args(sim, "by-hand"), "--op", "cli-create-2")
    assert ran.code == 0, ran
    volume_id = next(v.id for v in sim.volumes.values() if v.name == "by-hand")
    words = ran.out.split()
    assert words.count("pending") == words.count("executing") == words.count("completed") == 1
    assert volume_id in ran.out

    # The status of the finished operation, in words and as JSON.
    ran = await volumed_cli(nats_server, "status", "cli-create-2")
    assert ran.code == 0 and "completed" in ran.out and volume_id in ran.out
    ran = await volumed_cli(nats_server, "status", "cli-create-2", "--json")
    record = ran.lines()[0]
    assert record["status"] == "completed" and record["volume_id"] == volume_id
    assert record["completed_at"]


async def test_a_failed_operation_exits_1_with_its_code(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    unknown = str(uuid.uuid4())
    ran = await volumed_cli(nats_server, "attach", unknown, remote_vm(sim), "--op", "cli-fail")
    assert ran.code == 1, ran
    assert "failed" in ran.out and "not_found" in ran.out
    ran = await volumed_cli(
        nats_server, "attach", unknown, remote_vm(sim), "--op", "cli-fail", "--json"
    )
    assert ran.code == 1 and ran.lines()[-1]["error"]["code"] == "not_found"

    # The same through status, later; an unknown operation is not found.
    ran = await volumed_cli(nats_server, "status", "cli-fail")
    assert ran.code == 1 and "not_found" in ran.out
    ran = await volumed_cli(nats_server, "status", "no-such-operation", "--json")
    assert ran.code == 1 and ran.lines() == [
        {"error": {"code": "not_found", "message": ran.lines()[0]["error"]["message"]}}
    ]

    # An invalid command is rejected by volumed: exit 1 with invalid_request.
    ran = await volumed_cli(
        nats_server,
        "create",
        "x",
        "--size",
        str(1024**3 + 1),
        "--offering",
        sim.disk_offering_ids[0],
        "--zone",
        sim.zone_id,
        "--json",
    )
    assert ran.code == 1 and ran.lines()[-1]["status"] == "rejected"
    assert ran.lines()[-1]["error"]["code"] == "invalid_request"


async def test_usage_errors_exit_2(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    for args in (
        ["create", "x"],  # no size, offering, zone
        ["create", "x", "--size", "1.5G", "--offering", "o", "--zone", "z"],
        ["mapping"],  # neither --volume nor --device
        ["list", "--status", "done"],
        ["frobnicate"],
    ):
        ran = await volumed_cli(nats_server, *args)
        assert ran.code == 2, (args, ran)
        assert "usage:" in ran.err
    # A query volumed refuses as malformed is a usage error too.
    ran = await volumed_cli(nats_server, "status", "not an id!")
    assert ran.code == 2 and "operation_id" in ran.err
    assert (await volumed_cli(nats_server, "detach", "v", "--op", "not an id!")).code == 2


async def test_no_server_or_a_timeout_exits_3(nats_server: NatsServer) -> None:
    ran = await volumed_cli(
        None, "health", "--server", f"nats://127.0.0.1:{free_port()}", "--connect-timeout", "0.5"
    )
    assert ran.code == 3 and "unavailable" in ran.err
    # A server, but no volumed on it.
    ran = await volumed_cli(nats_server, "health", "--json")
    assert ran.code == 3 and ran.lines()[0]["error"]["code"] == "unavailable"
    ran = await volumed_cli(nats_server, "delete", "v")
    assert ran.code == 3 and "unavailable" in ran.err


async def test_watch_follows_an_operation_to_its_end(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    # Still executing while `watch` starts (CloudStack does not answer for a while).
    sim.inject(Fault(kind="hang", command="createVolume", seconds=2))
    await volumed.send("create", create_body(sim, "cli-watched", "watched"))
    ran = await volumed_cli(nats_server, "watch", "cli-watched", "--json")
    assert ran.code == 0, ran
    statuses = [e["status"] for e in ran.lines()]
    assert statuses[-1] == "completed"
    assert [STATUS_RANK[s] for s in statuses] == sorted({STATUS_RANK[s] for s in statuses})

    # Watched again when it has long ended: its terminal event at once.
    ran = await volumed_cli(nats_server, "watch", "cli-watched", "--json")
    assert ran.code == 0 and [e["status"] for e in ran.lines()] == ["completed"]
    # One that never comes: give up after the timeout.
    ran = await volumed_cli(nats_server, "watch", "never-sent", "--timeout", "0.5")
    assert ran.code == 3 and "timeout" in ran.err


async def test_watch_all_prints_every_event_until_interrupted(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    proc = await spawn(nats_server, VOLUMED, "watch", "--json")
    assert proc.stdout is not None and proc.stderr is not None
    try:
        # It says on stderr when it is subscribed.
        assert b"watching" in await asyncio.wait_for(proc.stderr.readline(), 30)
        await volumed.send("create", create_body(sim, "cli-all-1", "a"))
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["status"] != "completed":
            seen.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))
        assert [(e["operation_id"], e["status"]) for e in seen] == [
            ("cli-all-1", s) for s in ("pending", "executing", "completed")
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0


@pytest.mark.parametrize("entry", ["volumed", "python -m client"])
async def test_help_lists_the_user_commands(entry: str) -> None:
    import sys

    argv = [VOLUMED] if entry == "volumed" else [sys.executable, "-m", "client"]
    proc = await spawn(None, *argv, "-h")
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    for command in ("create", "attach", "watch", "vm-volumes", "health"):
        assert command in out.decode()


async def test_a_local_attach_ends_with_its_device(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=5, serials=True)) as local:
        harness = await start_devices(nats_server, database, local, sysfs, dev)
        try:
            ran = await volumed_cli(nats_server, *create_args(local, "local"), "--json")
            volume_id = ran.lines()[-1]["volume_id"]
            vm = str(local.local_vm_id)
            ran = await volumed_cli(nats_server, "attach", volume_id, vm)
            assert ran.code == 0, ran
            device = os.path.join(str(dev), str(device_of_volume(sysfs, volume_id)))
            # The last line a person reads names the device the volume became.
            assert device in ran.out.splitlines()[-1]

            ran = await volumed_cli(nats_server, "mapping", "--device", device, "--json")
            assert ran.code == 0 and ran.lines()[0]["volume_id"] == volume_id
            ran = await volumed_cli(nats_server, "mapping", "--volume", volume_id)
            assert ran.code == 0 and device in ran.out
        finally:
            await stop_volumed(harness, harness.task)  # type: ignore[attr-defined]
