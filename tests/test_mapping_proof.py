"""A mapping names the disk as it is now, proven, or names nothing (issue items 15, 13).

The daemon runs in-process against the simulator, which hot-plugs fake devices into a
sysfs/dev tree; a "reboot" renames the disks in the tree in another order, keeping their
serials, controllers and by-id links, as a guest kernel does."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from actors.persistence.records import Event, parse_time
from actors.persistence.schema import DEVICE_MAPPINGS, MYSQL, SQLITE
from actors.persistence.store import open_store
from bus import Bus
from schemas.common import GIB, serial_of
from schemas.devices import MappingProof, ProvenMapping
from schemas.events import OperationEvent
from simulator import Simulator
from tests.conftest import (
    Database,
    Harness,
    NatsServer,
    VolumedProcess,
    start_volumed,
    stop_volumed,
    volumed_env,
    wait_for,
)
from tests.test_devices_e2e import create_many, fake_tree, hotplugging, start
from tests.test_lifecycle import create_body, op, settings_for


@contextlib.asynccontextmanager
async def daemon(
    nats_server: NatsServer, database: Database, sim: Simulator, tree: tuple[Path, Path]
) -> AsyncIterator[Harness]:
    """volumed with every actor, watching the fake tree, for the length of the block."""
    v = await start(nats_server, database, sim, *tree)
    try:
        yield v
    finally:
        await stop_volumed(v, v.task)  # type: ignore[attr-defined]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    return fake_tree(tmp_path)


async def attach_local(v: Harness, sim: Simulator, volumes: list[str]) -> dict[str, str]:
    """Attach each volume to the local VM; return volume → device path of its event."""
    ops = {vol: op() for vol in volumes}
    for vol, o in ops.items():
        await v.send("attach", {"operation_id": o, "volume_id": vol, "vm_id": sim.local_vm_id})
    paths = {}
    for vol, o in ops.items():
        event = await v.terminal(o, timeout=30)
        assert event["status"] == "completed", event
        paths[vol] = str(event["device_path"])
    return paths


async def mapped(database: Database, vm_id: str | None) -> dict[str, dict[str, object]]:
    rows = await database.query("SELECT * FROM device_mappings WHERE vm_id = %s", vm_id)
    return {str(r["volume_id"]): r for r in rows}


async def rows_when(
    database: Database, sim: Simulator, ok: Callable[[dict[str, dict[str, object]]], bool]
) -> dict[str, dict[str, object]]:
    """The local VM's device_mappings rows, once ``ok`` holds for them."""

    async def check() -> dict[str, dict[str, object]] | None:
        rows = await mapped(database, sim.local_vm_id)
        return rows if ok(rows) else None

    return await wait_for(check, 20)  # type: ignore[no-any-return]


async def test_reboot_with_serials_maps_the_new_names(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=21, serials=True)) as sim:
        async with daemon(nats_server, database, sim, tree) as v:
            volumes = await create_many(v, sim, 3, [1])
            before = await attach_local(v, sim, volumes)
            await rows_when(database, sim, lambda rows: len(rows) == 3)

        # The appliance reboots: the kernel names the same three disks in another order.
        after = {vol: os.path.join(str(dev), name) for vol, name in sim.hotplug.reboot().items()}
        assert sum(after[vol] != before[vol] for vol in volumes) == 2  # vdb <-> vdd

        async with daemon(nats_server, database, sim, tree) as v:
            rows = await rows_when(
                database,
                sim,
                lambda rows: all(rows[vol]["device_path"] == after[vol] for vol in volumes),
            )
            for vol in volumes:
                assert rows[vol]["by_id_path"] == os.path.join(
                    str(dev), "disk", "by-id", f"virtio-{serial_of(vol)}"
                )
                assert rows[vol]["proof"] == "serial"
            # The queries say the same: by volume, by device path, and per VM.
            for vol in volumes:
                reply, code = await v.query("mapping", {"volume_id": vol})
                assert code is None
                assert reply["device_path"] == after[vol]
                assert reply["proof"] == "serial" and reply["proven_at"]
                by_path, _ = await v.query("mapping", {"device_path": after[vol]})
                assert by_path["volume_id"] == vol
            listed, _ = await v.query("vm_volumes", {"vm_id": sim.local_vm_id})
            volumes_listed: list[dict[str, object]] = listed["volumes"]  # type: ignore[assignment]
            assert {str(m["volume_id"]): m["device_path"] for m in volumes_listed} == after


async def test_restart_without_serials_names_no_device(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=22, serials=False)) as sim:
        async with daemon(nats_server, database, sim, tree) as v:
            volumes = await create_many(v, sim, 2, [1])
            paths = await attach_local(v, sim, volumes)
            await rows_when(database, sim, lambda rows: len(rows) == 2)
            # Another disk appears: the mappings are proven again, and while this correlator
            # runs the appearances it proved still prove them.
            (sysfs / "block" / "vdz").mkdir()
            (sysfs / "block" / "vdz" / "size").write_text(f"{3 * GIB // 512}\n")
            await rows_when(
                database,
                sim,
                lambda rows: all(
                    rows[vol]["proof"] == "exclusive" and rows[vol]["device_path"] == paths[vol]
                    for vol in volumes
                ),
            )

        # Same-size disks without serials, renamed by a reboot: nothing tells them apart.
        sim.hotplug.reboot()
        async with daemon(nats_server, database, sim, tree) as v:
            rows = await rows_when(
                database,
                sim,
                lambda rows: (
                    len(rows) == 2 and all(r["device_path"] is None for r in rows.values())
                ),
            )
            for row in rows.values():
                assert row["proof"] == "none"
                assert "no device with serial" in str(row["proof_reason"])
                assert row["by_id_path"] is None
            reply, code = await v.query("mapping", {"volume_id": volumes[0]})
            assert code is None
            assert reply["device_path"] is None and reply["proof"] == "none"
            assert reply["proof_reason"]


async def test_a_nats_restart_leaves_serial_less_mappings_proven(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    """A reconnect is no restart: after nats-server comes back the correlator reads the
    watcher's saved state again, finds the same disks and proves the mappings again, still
    by exclusion (issue 13, item 5)."""
    sysfs, dev = tree
    async with (
        Simulator(hotplugging(sysfs, dev, seed=25, serials=False)) as sim,
        daemon(nats_server, database, sim, tree) as v,
    ):
        volumes = await create_many(v, sim, 2, [1])
        paths = await attach_local(v, sim, volumes)

        def proven(rows: dict[str, dict[str, object]]) -> bool:
            return len(rows) == 2 and all(
                rows[vol]["proof"] == "exclusive" and rows[vol]["device_path"] == paths[vol]
                for vol in volumes
            )

        before = await rows_when(database, sim, proven)
        nats_server.stop()
        nats_server.start()
        # Proven again after the reconnect (the saved state read again asks for it).
        after = await rows_when(
            database,
            sim,
            lambda rows: all(rows[vol]["proven_at"] != before[vol]["proven_at"] for vol in volumes),
        )
        assert proven(after), after


async def test_mapped_device_that_disappears_names_no_device(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with (
        Simulator(hotplugging(sysfs, dev, seed=23, serials=True)) as sim,
        daemon(nats_server, database, sim, tree) as v,
    ):
        volumes = await create_many(v, sim, 2, [1])
        paths = await attach_local(v, sim, volumes)
        gone, kept = volumes
        await rows_when(database, sim, lambda rows: len(rows) == 2)
        # The disk goes without any detach through volumed (pulled by hand, a crash...).
        (sysfs / "block" / sim.devices[gone] / "size").write_text("0\n")

        rows = await rows_when(database, sim, lambda rows: rows[gone]["device_path"] is None)
        assert rows[gone]["proof"] == "none"
        assert f"serial {serial_of(gone)}" in str(rows[gone]["proof_reason"])
        assert rows[kept]["device_path"] == paths[kept]
        reply, _ = await v.query("mapping", {"device_path": paths[gone]})
        assert reply.get("volume_id") != gone


async def test_health_names_a_missing_correlator(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path]
) -> None:
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=24, serials=True)) as sim:
        settings = settings_for(
            nats_server,
            database,
            sim,
            sysfs=str(sysfs),
            dev=str(dev),
            devices=("vd*",),
            poll_interval=0.05,
            heartbeat_interval=0.2,
        )
        v, task = await start_volumed(settings, ["persistence", "executor", "watcher"], sim)
        try:

            async def settled() -> dict[str, object] | None:
                reply, code = await v.query("health", {})
                assert code is None
                checks = reply["checks"]
                ready = all(checks[n]["status"] == "ok" for n in ("cloudstack", "device_watcher"))  # type: ignore[index]
                return reply if ready else None

            reply = await wait_for(settled, 10)
            assert reply["status"] != "ok"
            check = reply["checks"]["correlator"]  # type: ignore[index]
            assert check["status"] == "down"
            assert "correlator" in check["detail"]
        finally:
            await stop_volumed(v, task)


# -- the store: columns added at start, a proof applied in one transaction -------------------


@pytest.fixture(params=["mysql", "sqlite"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/x.db"
    db: Database = request.getfixturevalue("database")
    return db.dsn


async def create_old_tables(dsn: str) -> None:
    """The tables as volumed created them before mapping proofs (no proof columns)."""
    old = dataclasses.replace(
        DEVICE_MAPPINGS,
        columns=tuple(c for c in DEVICE_MAPPINGS.columns if not c.name.startswith("pro")),
    )
    if dsn.startswith("sqlite://"):
        db = sqlite3.connect(dsn.removeprefix("sqlite://"))
        for statement in SQLITE.table_ddl(old):
            db.execute(statement)
        db.close()
        return
    import aiomysql

    name = dsn.rsplit("/", 1)[1]
    conn = await aiomysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{name}` COLLATE utf8mb4_bin")
            await cur.execute(f"USE `{name}`")
            for statement in MYSQL.table_ddl(old):
                await cur.execute(statement)
    finally:
        conn.close()


def attached(op_id: str, volume_id: str, path: str, t: int) -> Event:
    raw = OperationEvent(
        operation_id=op_id,
        type="attach",
        status="completed",
        volume_id=volume_id,
        vm_id="vm-1",
        device_path=path,
        at=f"2031-01-01T00:00:{t:02d}Z",
        size=GIB,
    )
    return Event(raw=raw, at=parse_time(raw.at))


def proven(volume_id: str, op_id: str, path: str | None) -> ProvenMapping:
    if path is None:
        return ProvenMapping(volume_id=volume_id, operation_id=op_id, proof="none", reason="gone")
    return ProvenMapping(
        volume_id=volume_id,
        operation_id=op_id,
        proof="serial",
        device_path=path,
        by_id_path=f"/dev/disk/by-id/virtio-{volume_id}",
    )


async def test_a_proof_swaps_names_only_for_the_same_attach_and_never_goes_back(dsn: str) -> None:
    await create_old_tables(dsn)
    store = await open_store(dsn)  # adds the proof columns to the existing table
    try:
        await store.apply(
            [
                attached("a1", "v1", "/dev/vdb", 1),
                attached("a2", "v2", "/dev/vdc", 2),
                attached("a3", "v3", "/dev/vdd", 3),
            ]
        )
        proof = MappingProof(
            vm_id="vm-1",
            at=time.time(),
            mappings=(
                proven("v1", "a1", "/dev/vdc"),  # a swap: vdb <-> vdc
                proven("v2", "a2", "/dev/vdb"),
                proven("v3", "an-older-attach", None),  # not this row's attach: untouched
            ),
        )
        assert await store.apply_proof(proof, 10) == 2
        by_volume = {m.volume_id: m for m in await store.vm_volumes("vm-1")}
        assert by_volume["v1"].device_path == "/dev/vdc"
        assert by_volume["v1"].by_id_path == "/dev/disk/by-id/virtio-v1"
        assert by_volume["v1"].proof == "serial" and by_volume["v1"].proven_at
        assert by_volume["v2"].device_path == "/dev/vdb"
        assert (by_volume["v3"].device_path, by_volume["v3"].proof) == ("/dev/vdd", None)
        # An older proof (earlier in the proofs stream, delivered late) never overwrites a
        # newer one.
        stale = MappingProof(
            vm_id="vm-1", at=proof.at - 10, mappings=(proven("v1", "a1", "/dev/vdb"),)
        )
        assert await store.apply_proof(stale, 9) == 0
        # A name recorded for a volume outside the proof is not taken: nothing is named.
        clash = MappingProof(
            vm_id="vm-1", at=proof.at + 1, mappings=(proven("v1", "a1", "/dev/vdd"),)
        )
        assert await store.apply_proof(clash, 11) == 1
        v1 = await store.mapping_by_volume("v1")
        assert v1 is not None and v1.device_path is None and v1.proof == "none"
        assert "v3" in str(v1.proof_reason)
        none = MappingProof(vm_id="vm-1", at=proof.at + 2, mappings=(proven("v2", "a2", None),))
        assert await store.apply_proof(none, 12) == 1
        v2 = await store.mapping_by_volume("v2")
        assert v2 is not None and (v2.device_path, v2.by_id_path) == (None, None)
        assert (v2.proof, v2.proof_reason) == ("none", "gone")
        assert await store.mapping_by_device("/dev/vdb") is None
    finally:
        await store.close()


async def test_reboot_of_a_real_volumed_process(
    nats_server: NatsServer, database: Database, tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same reboot from outside: `volumed run` as a process, SIGTERM, the disks renamed,
    a new process; only the bus, the database and the fake tree are looked at."""
    sysfs, dev = tree
    async with Simulator(hotplugging(sysfs, dev, seed=25, serials=True)) as sim:
        env = volumed_env(
            nats_server.url,
            database.dsn,
            sim,
            VOLUMED_SYSFS=str(sysfs),
            VOLUMED_DEV=str(dev),
            VOLUMED_DEVICES="vd*",
            VOLUMED_POLL_INTERVAL="0.05",
        )
        log = tmp_path / "volumed.log"
        user = await Bus.connect(nats_server.url, "user")
        completed: dict[str, dict[str, object]] = {}

        async def on_event(_s: str, data: bytes, _r: str | None) -> None:
            event = json.loads(data)
            if event["status"] in ("completed", "failed"):
                completed[event["operation_id"]] = event

        await user.subscribe("volume.events.>", on_event)
        process = VolumedProcess(env, (), log_path=log)
        try:
            await process.start()
            creates = [op() for _ in range(3)]
            for i, o in enumerate(creates):
                body = create_body(sim, o, f"proc-{i}")
                await wait_for(lambda b=body: publish(user, "volume.cmd.create", b), 30, 0.2)
            volumes = []
            for o in creates:
                event = await wait_for(lambda o=o: completed.get(o), 30)
                assert event["status"] == "completed", event
                volumes.append(str(event["volume_id"]))
            for vol in volumes:
                o = op()
                await user.publish(
                    "volume.cmd.attach",
                    {"operation_id": o, "volume_id": vol, "vm_id": sim.local_vm_id},
                )
                event = await wait_for(lambda o=o: completed.get(o), 30)
                assert event["status"] == "completed", event
            await rows_when(database, sim, lambda rows: len(rows) == 3)
            assert await process.stop() == 0

            after = {
                vol: os.path.join(str(dev), name) for vol, name in sim.hotplug.reboot().items()
            }
            process = VolumedProcess(env, (), log_path=log)
            await process.start()
            await rows_when(
                database,
                sim,
                lambda rows: all(rows[vol]["device_path"] == after[vol] for vol in volumes),
            )
            for vol in volumes:
                reply = json.loads(await user.request("volume.api.mapping", {"volume_id": vol}))
                assert (reply["device_path"], reply["proof"]) == (after[vol], "serial")
            assert await process.stop() == 0
        finally:
            await user.close()
            if process.proc is not None and process.proc.returncode is None:
                await process.kill()
        assert sim.secret_key not in log.read_text()


async def publish(bus: Bus, subject: str, body: object) -> bool:
    """Publish a command once the stream exists (the process provisions it)."""
    try:
        await bus.publish(subject, body)
        return True
    except Exception:
        return False
