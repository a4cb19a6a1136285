"""The tables are a projection of the log: a rebuild from the streams into an empty database
gives the rows a live volumed wrote, and dead letters can be re-applied after a fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.persistence.maintenance import NotEmpty, dead_letters, rebuild
from bus import Bus
from bus.consumer import dead_letter
from bus.topology import (
    DEAD_LETTERS,
    EVENTS,
    EXECUTOR,
    PERSISTENCE,
    PERSISTENCE_PROOFS,
    TOPOLOGY,
    event_subject,
    proof_subject,
)
from schemas.devices import MappingProof, ProvenMapping
from simulator import Fault, SimConfig, Simulator
from tests.conftest import Database, NatsServer, start_volumed, stop_volumed, wait_for
from tests.test_lifecycle import create_body, remote_vm, settings_for
from tests.test_persistence import Rows, ev

# The writer's own clock: when this database last changed the row (updated_at, last_sync),
# and device_mappings.id, a surrogate key whose values MariaDB hands out per insert attempt
# (an upsert that updates consumes one too). Everything else comes from the log.
CLOCK_COLUMNS = {"volume_operations": {"updated_at"}, "device_mappings": {"id", "last_sync"}}
KEYS = {"volume_operations": "id", "device_mappings": "volume_id"}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=1)) as s:
        yield s


@pytest.fixture
async def second(database: Database) -> AsyncIterator[Database]:
    """Another empty database next to ``database``, dropped afterwards."""
    other = Database(name=f"{database.name}_re")
    yield other
    await database.query(f"DROP DATABASE IF EXISTS `{other.name}`")


async def table(db: Database, name: str) -> dict[str, dict[str, Any]]:
    rows = await db.query(f"SELECT * FROM {name}")
    return {
        str(r[KEYS[name]]): {k: v for k, v in r.items() if k not in CLOCK_COLUMNS[name]}
        for r in rows
    }


async def test_a_rebuild_from_the_streams_gives_the_same_rows(
    nats_server: NatsServer, database: Database, second: Database, sim: Simulator, tmp_path: Path
) -> None:
    v, task = await start_volumed(
        settings_for(nats_server, database, sim), ["persistence", "executor"], sim
    )
    try:
        vm = remote_vm(sim)
        ops: list[str] = []

        async def run(kind: str, body: dict[str, Any]) -> dict[str, Any]:
            op_id = body.setdefault("operation_id", f"r-{uuid.uuid4().hex[:12]}")
            ops.append(op_id)
            await v.send(kind, body)
            return await v.terminal(op_id)

        async def status(kind: str, body: dict[str, Any]) -> str:
            return str((await run(kind, body))["status"])

        volumes = [
            str((await run("create", create_body(sim, name=f"v{i}")))["volume_id"])
            for i in range(4)
        ]
        sim.inject(Fault(kind="job", command="createVolume", errortext="pool full"))
        assert await status("create", create_body(sim, name="nope")) == "failed"
        for volume in volumes[:3]:
            assert await status("attach", {"volume_id": volume, "vm_id": vm}) == "completed"
        sim.inject(Fault(kind="job", command="attachVolume", errortext="no free slot"))
        assert await status("attach", {"volume_id": volumes[3], "vm_id": vm}) == "failed"
        assert await status("detach", {"volume_id": volumes[0]}) == "completed"
        assert await status("delete", {"volume_id": volumes[1]}) == "completed"  # attached
        assert await status("attach", {"volume_id": volumes[0], "vm_id": vm}) == "completed"
        sim.inject(Fault(kind="job", command="detachVolume", errortext="device busy"))
        assert await status("detach", {"volume_id": volumes[2]}) == "failed"
        for op_id in ops:
            await v.row(database, op_id)
        # A correlator's proof of the VM's mappings (here: none can be proven).
        mapped = await database.query("SELECT volume_id, operation_id FROM device_mappings")
        proof = MappingProof(
            vm_id=vm,
            at=1.9e9,
            mappings=tuple(
                ProvenMapping(
                    volume_id=str(m["volume_id"]),
                    operation_id=str(m["operation_id"]),
                    proof="none",
                    reason="no device of this VM is seen here",
                )
                for m in mapped
            ),
        )
        await v.bus.publish(proof_subject(vm), proof)
        await wait_for(lambda: database.query("SELECT 1 FROM device_mappings WHERE proof='none'"))
        for spec in (PERSISTENCE, PERSISTENCE_PROOFS):  # every message in the database
            await wait_for(lambda spec=spec: _idle(v.bus, spec))
    finally:
        await stop_volumed(v, task)

    bus = await Bus.connect(nats_server.url, "rebuild")
    try:
        done = await rebuild(bus, second.dsn)
        assert done.events >= 3 * len(ops) and done.proofs == 1 and done.skipped == 0
        for name in ("volume_operations", "device_mappings"):
            live, rebuilt = await table(database, name), await table(second, name)
            assert rebuilt == live, name
            assert len(live) == {"volume_operations": len(ops), "device_mappings": 2}[name]
        # device_mappings: volumes[0] (attached again) and volumes[2] (its detach failed).
        with pytest.raises(NotEmpty, match="volume_operations has"):
            await rebuild(bus, second.dsn)
        assert done.first_event == 1
        # The oldest event aged out: the rebuild says where the stream now starts.
        await bus.delete_stored(EVENTS.name, await bus.first_sequence(EVENTS.name))
        notes: list[str] = []
        partial = await rebuild(bus, f"sqlite:///{tmp_path / 'partial.db'}", progress=notes.append)
        assert partial.first_event > 1 and partial.events == done.events - 1
        assert any("the events before it are gone" in n for n in notes), notes
    finally:
        await bus.close()


async def _idle(bus: Any, spec: Any) -> bool:
    return bool((await bus.consumer_progress(spec)).idle)


async def test_dead_letters_are_listed_and_replayed_by_the_command(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Events an older volumed dead-lettered ("INSERT command denied"), applied with
    `volumed dead-letters replay` once the database takes them; an event that still cannot
    be written stays."""
    bus = await Bus.connect(nats_server.url, "test")
    await bus.provision(TOPOLOGY)
    good = [ev("lost-1", "create", "pending", 0), ev("lost-1", "create", "completed", 1)]
    try:
        for i, event in enumerate(good, 1):
            data = json.dumps({f: getattr(event, f) for f in event.__struct_fields__}).encode()
            await dead_letter(
                bus, PERSISTENCE, event_subject("lost-1"), data, i, 1, "INSERT command denied"
            )
        await dead_letter(bus, PERSISTENCE, event_subject("bad"), b"{", 3, 1, "not JSON")
        await dead_letter(bus, EXECUTOR, "volume.cmd.create", b"{}", 1, 8, "gave up")
        assert len(await dead_letters(bus, subject="volume.events.lost-1")) == 2

        dsn = f"sqlite://{tmp_path}/v.db"
        env = {**os.environ, "VOLUMED_NATS_URL": nats_server.url, "VOLUMED_DB_DSN": dsn}
        assert [d.reason for d in await dead_letters(bus)][-2:] == ["not JSON", "gave up"]
        code, out = await _volumed(env, "dead-letters", "replay")
        assert code == 1, out  # one is still not writable
        assert out.count("\tapplied") == 2 and "still not writable" in out
        assert "1 dead letters of other consumers (commands) left alone" in out
        row = (await Rows(dsn, None)("SELECT status, created_at FROM volume_operations"))[0]
        assert row["status"] == "completed"
        assert row["created_at"].startswith(str(dt.date(2030, 1, 1)))
        left = await dead_letters(bus)
        assert [d.subject for d in left] == [event_subject("bad"), "volume.cmd.create"]
        assert (await bus.js.stream_info(DEAD_LETTERS.name)).state.messages == 2
    finally:
        await bus.close()


async def _volumed(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode()
