"""An operation never detaches, deletes or adopts a volume, attachment or device it did not
make; device_mappings follows what CloudStack did; transient outages are waited out; the
local VM id does not depend on where the credentials come from. Each test drives the running
daemon against the simulator, real NATS and MariaDB."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from schemas.common import GIB
from simulator import Fault, SimConfig, Simulator
from tests import test_lifecycle
from tests.conftest import Database, Harness, NatsServer, start_volumed, stop_volumed, wait_for
from tests.test_devices_e2e import fake_tree, hotplugging
from tests.test_devices_e2e import start as start_local
from tests.test_lifecycle import (
    ACTORS,
    create_body,
    create_volume,
    op,
    remote_vm,
    settings_for,
)
from tests.test_ossea import OSSEA_DDL, execute

# The lifecycle tests' fixtures: a simulator, and volumed (persistence and executor) on it.
sim = test_lifecycle.sim
volumed = test_lifecycle.volumed


async def mapping_rows(database: Database, volume_id: str) -> list[dict[str, object]]:
    """The volume's mapping rows; none while persistence has not created the table yet."""
    import pymysql

    try:
        return await database.query("SELECT * FROM device_mappings WHERE volume_id=%s", volume_id)
    except pymysql.err.ProgrammingError as e:
        if e.args[0] == 1146:  # no such table (yet)
            return []
        raise


async def attach(v: Harness, volume_id: str, vm_id: str | None) -> tuple[str, dict[str, object]]:
    """Attach and wait for the terminal event; return the operation id and the event."""
    o = op()
    await v.send("attach", {"operation_id": o, "volume_id": volume_id, "vm_id": vm_id})
    return o, await v.terminal(o, timeout=30)


# -- a create ends with its own volume --------------------------------------------------------


@pytest.mark.parametrize("gib", [5, 1], ids=["other_size", "same_size"])
async def test_a_create_never_adopts_another_operations_volume(
    volumed: Harness, sim: Simulator, gib: int
) -> None:
    a, b = op(), op()
    await volumed.send("create", create_body(sim, a, "data-1", gib=1))
    first = await volumed.terminal(a)
    assert first["status"] == "completed", first
    theirs = str(first["volume_id"])

    # B's first createVolume gets a 503 (a proxy's page: it may or may not have passed), so
    # B looks the volume up by name before it sends again, and finds A's.
    sim.inject(Fault(kind="http", command="createVolume", status=503))
    await volumed.send("create", create_body(sim, b, "data-1", gib=gib))
    second = await volumed.terminal(b)
    assert second["volume_id"] != theirs, "B adopted A's volume"
    assert second["status"] == "completed", second
    mine = str(second["volume_id"])
    assert sim.volumes[mine].size == gib * GIB
    named = sorted(v.id for v in sim.volumes.values() if v.name == "data-1")
    assert named == sorted([theirs, mine])

    x = op()
    await volumed.send("delete", {"operation_id": x, "volume_id": second["volume_id"]})
    assert (await volumed.terminal(x))["status"] == "completed"
    assert theirs in sim.volumes and mine not in sim.volumes


async def test_a_create_waits_for_a_twin_whose_answer_is_slow(
    volumed: Harness, sim: Simulator
) -> None:
    """A's createVolume made its volume but the answer is slow; B (same name, size, zone and
    offering) gets a 503 and looks up: A's volume is not claimed yet, so B waits for A to
    settle, sees that A holds it, and makes its own."""
    a, b = op(), op()
    sim.inject(Fault(kind="accept_then_hang", command="createVolume", seconds=1.5))
    sim.inject(Fault(kind="http", command="createVolume", status=503))
    await volumed.send("create", create_body(sim, a, "twin"))
    await wait_for(lambda: any(c.command == "createVolume" for c in sim.calls))
    await volumed.send("create", create_body(sim, b, "twin"))
    first, second = await volumed.terminal(a), await volumed.terminal(b)
    assert first["status"] == "completed" and second["status"] == "completed", (first, second)
    assert first["volume_id"] != second["volume_id"]
    named = sorted(v.id for v in sim.volumes.values() if v.name == "twin")
    assert named == sorted([str(first["volume_id"]), str(second["volume_id"])])


async def test_creates_in_doubt_are_seen_across_executor_processes(
    nats_server: NatsServer, database: Database, sim: Simulator
) -> None:
    """A's createVolume made its volume but its answer is slow, in executor one; B (same
    name, size, zone and offering), in executor two, loses its request (the connection drops
    before CloudStack sees it) and looks up: it finds A's volume, which no operation holds
    yet. Executor two knows nothing of A in memory, and A wrote nothing for it: persistence
    tells it A is in doubt (A stored its executing event before it sent createVolume), so B
    waits, sees A claim the volume, and makes its own instead of adopting A's."""
    settings = settings_for(
        nats_server, database, sim, instance="ex-one", host_id="host-one", executor_concurrency=1
    )
    one, one_task = await start_volumed(settings, ["persistence", "executor"], sim)
    two = None
    try:
        a, b = op(), op()
        sim.inject(Fault(kind="accept_then_hang", command="createVolume", seconds=4.0))
        await one.send("create", create_body(sim, a, "twin-across"))
        await wait_for(lambda: any(c.command == "createVolume" for c in sim.calls))
        # Executor one runs A, at most one operation at once. Commands it pulls meanwhile
        # wait behind A, and while one of them waits for something else first (parked) its
        # consumer may open another pull: fillers are sent until one stays untaken, when
        # every command executor one holds waits for its one working slot and no pull of it
        # is open. Executor two, started then, takes that filler and B.
        for n in range(10):
            filler = op()
            # (A delete of a volume that does not exist: it sends no createVolume.)
            await one.send("delete", {"operation_id": filler, "volume_id": f"no-such-{n}"})
            try:
                await wait_for(lambda f=filler: one.statuses(f), timeout=1.5)
            except AssertionError:
                break
        else:
            raise AssertionError("executor one kept taking commands while A ran")
        two = await start_volumed(
            msgspec.structs.replace(settings, instance="ex-two", host_id="host-two"),
            ["executor"],
            sim,
        )
        sim.inject(Fault(kind="drop", command="createVolume"))
        await one.send("create", create_body(sim, b, "twin-across"))
        first, second = await one.terminal(a, timeout=30), await one.terminal(b, timeout=30)
        assert first["status"] == "completed" and second["status"] == "completed", (first, second)
        ran_on = {
            o: {e["clock"] for e in one.events[o] if e["status"] == "executing"} for o in (a, b)
        }
        assert ran_on == {a: {"host-one"}, b: {"host-two"}}, ran_on
        theirs, mine = str(first["volume_id"]), str(second["volume_id"])
        assert mine != theirs, "B adopted A's volume"
        named = sorted(v.id for v in sim.volumes.values() if v.name == "twin-across")
        assert named == sorted([theirs, mine])
        calls = sim.call_log.select("createVolume", name="twin-across")
        # A's; B's dropped one; B's own, sent only after A had claimed its volume.
        assert [c.accepted for c in calls] == [True, False, True], calls
    finally:
        if two is not None:
            await stop_volumed(*two)
        await stop_volumed(one, one_task)


# -- device_mappings follows CloudStack ------------------------------------------------------


async def test_a_delete_that_detached_then_failed_leaves_no_mapping(
    volumed: Harness, sim: Simulator, database: Database
) -> None:
    volume_id = await create_volume(volumed, sim, "detached-then-kept")
    x = op()
    _, attached = await attach(volumed, volume_id, remote_vm(sim))
    assert attached["status"] == "completed", attached
    await wait_for(lambda: mapping_rows(database, volume_id))

    # deleteVolume is refused for good (not a transient error): the detach stays done.
    sim.inject(Fault(kind="http", command="deleteVolume", status=431, errortext="pool is busy"))
    await volumed.send("delete", {"operation_id": x, "volume_id": volume_id})
    event = await volumed.terminal(x)
    assert event["status"] == "failed", event
    assert event["error"]["code"] == "cloudstack_error"  # type: ignore[index]
    assert "was detached" in event["error"]["message"]  # type: ignore[index]
    assert event["attached"] is False
    assert volume_id in sim.volumes and sim.volumes[volume_id].vm_id is None

    async def unmapped() -> bool:
        await volumed.row(database, x, "failed")
        return not await mapping_rows(database, volume_id)

    await wait_for(unmapped)


async def test_an_attach_whose_roll_back_fails_keeps_a_mapping(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    # The simulator hot-plugs nothing (no sysfs root): the device never appears.
    async with Simulator(SimConfig(seed=32)) as sim:
        v = await start_local(nats_server, database, sim, sysfs, dev, correlation_timeout=0.5)
        try:
            volume_id = await create_volume(v, sim, "stuck-on")
            sim.inject(Fault(kind="http", command="detachVolume", status=431, errortext="busy"))
            _, event = await attach(v, volume_id, sim.local_vm_id)
            assert event["status"] == "failed", event
            assert event["error"]["code"] == "device_timeout"  # type: ignore[index]
            assert "still attached" in event["error"]["message"]  # type: ignore[index]
            assert sim.volumes[volume_id].vm_id == sim.local_vm_id

            rows = await wait_for(lambda: mapping_rows(database, volume_id))
            assert rows[0]["vm_id"] == sim.local_vm_id and rows[0]["device_path"] is None
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


# -- a second attach never touches a live attachment ------------------------------------------


@pytest.mark.parametrize("serials", [True, False], ids=["serials", "no_serials"])
async def test_a_second_attach_never_detaches_a_live_attachment(
    nats_server: NatsServer, database: Database, tmp_path: Path, serials: bool
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=33, serials=serials)) as sim:
        v = await start_local(nats_server, database, sim, sysfs, dev, correlation_timeout=2.0)
        try:
            volume_id = await create_volume(v, sim, "live")
            first, attached = await attach(v, volume_id, sim.local_vm_id)
            assert attached["status"] == "completed" and attached["device_path"], attached
            await wait_for(lambda: mapping_rows(database, volume_id))

            # The next attachVolume request is lost (the connection drops, nothing changes).
            sim.inject(Fault(kind="drop", command="attachVolume"))
            again, event = await attach(v, volume_id, sim.local_vm_id)
            assert event["status"] == "failed", event
            assert event["error"]["code"] == "conflict"  # type: ignore[index]
            assert "already attached" in event["error"]["message"]  # type: ignore[index]
            assert event["device_path"] is None

            await v.row(database, again, "failed")
            assert sim.volumes[volume_id].vm_id == sim.local_vm_id
            assert [c for c in sim.calls if c.command == "detachVolume"] == []
            rows = await mapping_rows(database, volume_id)
            assert [r["device_path"] for r in rows] == [attached["device_path"]]
            assert rows[0]["operation_id"] == first
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


# -- a CloudStack outage is waited out ------------------------------------------------------


async def test_an_outage_longer_than_the_old_retries_is_waited_out(
    nats_server: NatsServer, database: Database, sim: Simulator
) -> None:
    settings = settings_for(
        nats_server,
        database,
        sim,
        cloudstack_retry_budget=600.0,
        cloudstack_retry_backoff=0.05,
        cloudstack_retry_cap=0.5,
        heartbeat_interval=0.2,
    )
    v, task = await start_volumed(settings, ACTORS, sim)
    try:
        volumes = [await create_volume(v, sim, f"outage-attach-{n}") for n in range(3)]
        sim.set_latency(0.3)  # jobs still running when CloudStack goes away
        vm = remote_vm(sim)
        creates = {op(): f"outage-create-{n}" for n in range(3)}
        attaches = {op(): volume_id for volume_id in volumes}
        for o, name in creates.items():
            await v.send("create", create_body(sim, o, name))
        for o, volume_id in attaches.items():
            await v.send("attach", {"operation_id": o, "volume_id": volume_id, "vm_id": vm})
        await wait_for(lambda: all("executing" in v.statuses(o) for o in [*creates, *attaches]))

        # Every request fails with 503 for 8 s: far longer than the old 6 attempts took.
        sim.inject(Fault(kind="http", status=503, lasting=8.0))

        async def cloudstack_is(wanted: str) -> bool:
            reply, _ = await v.query("health", {})
            return reply["checks"]["cloudstack"]["status"] == wanted  # type: ignore[index,no-any-return]

        await wait_for(lambda: cloudstack_is("degraded"), 5)
        assert all(v.statuses(o)[-1] == "executing" for o in [*creates, *attaches])

        for o in [*creates, *attaches]:
            event = await v.terminal(o, timeout=60)
            assert event["status"] == "completed", event
        await wait_for(lambda: cloudstack_is("ok"), 10)

        answered = [c for c in sim.calls if c.fault is None]
        for name in creates.values():
            assert (
                len(
                    [
                        c
                        for c in answered
                        if c.command == "createVolume" and c.params.get("name") == name
                    ]
                )
                == 1
            )
            assert len([x for x in sim.volumes.values() if x.name == name]) == 1
        for volume_id in volumes:
            sent = [
                c
                for c in answered
                if c.command == "attachVolume" and c.params.get("id") == volume_id
            ]
            assert len(sent) == 1
            assert sim.volumes[volume_id].vm_id == vm
    finally:
        sim.set_latency(0)
        await stop_volumed(v, task)


# -- the local VM id, whatever the credentials' source ---------------------------------------


async def test_local_vm_id_comes_from_ossea_configs_with_credentials_in_env(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=34, serials=True)) as sim:
        await execute(database, OSSEA_DDL)
        # The row's credentials are wrong: only its oma_vm_id may be used.
        await execute(
            database,
            "INSERT INTO ossea_configs (name, api_url, api_key, secret_key, oma_vm_id, is_active)"
            " VALUES ('row', 'http://127.0.0.1:9/client/api', 'k', 'wrong', %s, 1)",
            sim.local_vm_id,
        )
        v = await start_local(nats_server, database, sim, sysfs, dev, vm_id=None)
        try:
            volume_id = await create_volume(v, sim, "local-by-row")
            _, event = await attach(v, volume_id, sim.local_vm_id)
            assert event["status"] == "completed", event
            assert event["device_path"] == str(dev / sim.devices[volume_id])
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


async def test_an_attach_fails_clearly_while_the_local_vm_is_unknown(
    nats_server: NatsServer, database: Database, sim: Simulator
) -> None:
    settings = settings_for(
        nats_server, database, sim, vm_id=None, correlation_timeout=0.5, heartbeat_interval=0.2
    )
    v, task = await start_volumed(settings, ACTORS, sim)
    try:

        async def local_vm() -> dict[str, object] | None:
            try:
                reply, _ = await v.query("health", {})
            except Exception:  # the service may not have registered yet
                return None
            return reply["checks"].get("local_vm")  # type: ignore[union-attr, no-any-return]

        check = await wait_for(local_vm, 5)
        assert check["status"] == "down" and "VOLUMED_VM_ID" in str(check["detail"])
        volume_id = await create_volume(v, sim, "nowhere")
        _, event = await attach(v, volume_id, remote_vm(sim))
        assert event["status"] == "failed", event
        assert "VOLUMED_VM_ID" in event["error"]["message"]  # type: ignore[index]
        assert [c for c in sim.calls if c.command == "attachVolume"] == []
    finally:
        await stop_volumed(v, task)
