"""The volume lifecycle end to end: commands on NATS, the executor, the CloudStack simulator
through the real `cs` client, events, and (where the persistence actor runs) MariaDB rows."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from schemas.common import GIB
from schemas.config import Settings
from simulator import Fault, SimConfig, Simulator
from tests.conftest import Database, Harness, NatsServer, start_volumed, stop_volumed, wait_for

ACTORS = ["persistence", "executor"]
# The fields every event has (contract §3).
EVENT_FIELDS = frozenset(
    {
        "operation_id",
        "type",
        "status",
        "volume_id",
        "vm_id",
        "device_path",
        "by_id_path",
        "error",
        "at",
    }
)


def settings_for(nats: NatsServer, database: Database, sim: Simulator, **over: object) -> Settings:
    base: dict[str, object] = dict(
        nats_url=nats.url,
        db_dsn=database.dsn,
        cloudstack_endpoint=sim.url,
        cloudstack_key=sim.api_key,
        cloudstack_secret=sim.secret_key,
        vm_id=sim.local_vm_id,
        # Short enough for the tests that wait for cloudstack_unavailable.
        cloudstack_retry_budget=2.0,
        cloudstack_retry_cap=0.2,
        cloudstack_retry_backoff=0.02,
        cloudstack_poll_interval=0.05,
        instance="test",
    )
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def sim():  # type: ignore[no-untyped-def]
    async with Simulator(SimConfig(seed=1)) as s:
        yield s


@pytest.fixture
async def volumed(nats_server: NatsServer, database: Database, sim: Simulator):  # type: ignore[no-untyped-def]
    harness, task = await start_volumed(settings_for(nats_server, database, sim), ACTORS, sim)
    yield harness
    await stop_volumed(harness, task)


def op() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def remote_vm(sim: Simulator) -> str:
    return next(v for v in sim.vm_ids if v != sim.local_vm_id)


def create_body(
    sim: Simulator, op_id: str | None = None, name: str = "vol", gib: int = 1
) -> dict[str, object]:
    body: dict[str, object] = {
        "name": name,
        "size": gib * GIB,
        "disk_offering_id": sim.disk_offering_ids[0],
        "zone_id": sim.zone_id,
    }
    if op_id:
        body["operation_id"] = op_id
    return body


async def create_volume(v: Harness, sim: Simulator, name: str = "vol") -> str:
    op_id = op()
    await v.send("create", create_body(sim, op_id, name))
    event = await v.terminal(op_id)
    assert event["status"] == "completed", event
    return str(event["volume_id"])


def calls(sim: Simulator, command: str) -> list[object]:
    return [c for c in sim.calls if c.command == command]


async def test_lifecycle_remote_vm(volumed: Harness, sim: Simulator, database: Database) -> None:
    vm = remote_vm(sim)
    c, a, d, x = op(), op(), op(), op()
    await volumed.send("create", create_body(sim, c, "data-1", gib=5))
    created = await volumed.terminal(c)
    assert volumed.statuses(c) == ["pending", "executing", "completed"]
    volume_id = created["volume_id"]
    assert volume_id and sim.volumes[str(volume_id)].size == 5 * GIB

    await volumed.send("attach", {"operation_id": a, "volume_id": volume_id, "vm_id": vm})
    attached = await volumed.terminal(a)
    assert attached["status"] == "completed", attached
    assert attached["vm_id"] == vm and attached["device_path"] is None
    assert volumed.statuses(a) == ["pending", "executing", "completed"]

    await volumed.send("detach", {"operation_id": d, "volume_id": volume_id})
    detached = await volumed.terminal(d)
    assert detached["status"] == "completed" and detached["vm_id"] == vm

    await volumed.send("delete", {"operation_id": x, "volume_id": volume_id})
    assert (await volumed.terminal(x))["status"] == "completed"
    assert str(volume_id) not in sim.volumes

    # Every event has the contract's fields, and `at` is RFC 3339 UTC.
    for event in volumed.events[c]:
        assert set(event) >= EVENT_FIELDS
        assert str(event["at"]).endswith("Z")

    row = await volumed.row(database, c, "completed")
    assert row["volume_id"] == volume_id and row["type"] == "create"
    assert row["completed_at"] is not None
    await volumed.row(database, x, "completed")
    # The mapping existed while attached and is gone after the detach.
    assert await database.query("SELECT * FROM device_mappings WHERE volume_id=%s", volume_id) == []


async def test_attach_as_root_uses_deviceid_0(volumed: Harness, sim: Simulator) -> None:
    volume_id = await create_volume(volumed, sim)
    a = op()
    # A VM without a root disk: use a fresh VM id from the simulator's world if it has one.
    vm = remote_vm(sim)
    await volumed.send(
        "attach", {"operation_id": a, "volume_id": volume_id, "vm_id": vm, "as_root": True}
    )
    await volumed.terminal(a)
    attach_calls = calls(sim, "attachVolume")
    assert attach_calls and attach_calls[-1].params.get("deviceid") == "0"


async def test_delete_of_attached_volume_detaches_first(volumed: Harness, sim: Simulator) -> None:
    volume_id = await create_volume(volumed, sim)
    a, x = op(), op()
    await volumed.send(
        "attach", {"operation_id": a, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    )
    assert (await volumed.terminal(a))["status"] == "completed"
    await volumed.send("delete", {"operation_id": x, "volume_id": volume_id})
    event = await volumed.terminal(x)
    assert event["status"] == "completed", event
    assert volume_id not in sim.volumes
    order = [c.command for c in sim.calls if c.command in ("detachVolume", "deleteVolume")]
    assert order == ["detachVolume", "deleteVolume"]


@pytest.mark.parametrize(
    "case",
    ["attach_unknown", "attach_attached", "detach_detached", "delete_unknown", "detach_unknown"],
)
async def test_error_codes(volumed: Harness, sim: Simulator, case: str) -> None:
    vm = remote_vm(sim)
    unknown = str(uuid.uuid4())
    if case == "attach_unknown":
        o, expected = op(), "not_found"
        await volumed.send("attach", {"operation_id": o, "volume_id": unknown, "vm_id": vm})
    elif case == "delete_unknown":
        o, expected = op(), "not_found"
        await volumed.send("delete", {"operation_id": o, "volume_id": unknown})
    elif case == "detach_unknown":
        o, expected = op(), "not_found"
        await volumed.send("detach", {"operation_id": o, "volume_id": unknown})
    else:
        volume_id = await create_volume(volumed, sim)
        if case == "attach_attached":
            first = op()
            await volumed.send(
                "attach", {"operation_id": first, "volume_id": volume_id, "vm_id": vm}
            )
            await volumed.terminal(first)
            o = op()
            await volumed.send("attach", {"operation_id": o, "volume_id": volume_id, "vm_id": vm})
        else:
            o = op()
            await volumed.send("detach", {"operation_id": o, "volume_id": volume_id})
        expected = "conflict"
    event = await volumed.terminal(o)
    assert event["status"] == "failed"
    assert event["error"]["code"] == expected, event  # type: ignore[index]
    assert event["error"]["message"]  # type: ignore[index]
    assert volumed.statuses(o) == ["pending", "executing", "failed"]


async def test_same_operation_id_is_done_once(
    volumed: Harness, sim: Simulator, database: Database
) -> None:
    o = op()
    body = create_body(sim, o, "once")
    for _ in range(3):
        await volumed.send("create", body)
    first = await volumed.terminal(o)
    await volumed.send("create", body)  # again after completion
    await wait_for(lambda: len([e for e in volumed.events[o] if e["status"] == "completed"]) >= 2)
    assert len([c for c in calls(sim, "createVolume") if c.params.get("name") == "once"]) == 1
    republished = [e for e in volumed.events[o] if e["status"] == "completed"]
    assert all(e["volume_id"] == first["volume_id"] for e in republished)
    await volumed.row(database, o, "completed")
    assert len(await database.query("SELECT id FROM volume_operations WHERE id=%s", o)) == 1


async def test_nats_msg_id_without_operation_id(
    volumed: Harness, sim: Simulator, database: Database
) -> None:
    o = op()
    body = create_body(sim, None, "by-header")
    for _ in range(3):
        await volumed.send("create", body, headers={"Nats-Msg-Id": o})
        await asyncio.sleep(0.15)  # past JetStream's own (minimal) dedupe window
    await volumed.terminal(o)
    await asyncio.sleep(0.3)
    assert len([c for c in calls(sim, "createVolume") if c.params.get("name") == "by-header"]) == 1
    await volumed.row(database, o, "completed")


INVALID: list[tuple[str, object]] = [
    ("create", b""),
    ("create", b"not json"),
    ("create", b"[1, 2]"),
    ("create", {"size": GIB, "disk_offering_id": "d", "zone_id": "z"}),  # no name
    ("create", {"name": "v", "disk_offering_id": "d", "zone_id": "z"}),  # no size
    ("create", {"name": "v", "size": 0, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "v", "size": -GIB, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "v", "size": GIB + 1, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "v", "size": "1073741824", "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "v", "size": 1.5, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "", "size": GIB, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "a~b", "size": GIB, "disk_offering_id": "d", "zone_id": "z"}),
    ("create", {"name": "v", "size": GIB, "zone_id": "z"}),  # no offering
    (
        "create",
        {"name": "v", "size": GIB, "disk_offering_id": "d", "zone_id": "z", "metadata": {"k": 1}},
    ),
    ("attach", {"volume_id": "v1"}),  # no vm
    ("attach", {"volume_id": "a b", "vm_id": "x"}),
    ("attach", {"volume_id": "v1", "vm_id": "x", "as_root": "yes"}),
    ("detach", {}),
    ("delete", {"volume_id": None}),
    ("delete", {"volume_id": 42}),
    ("cancel", {}),
    ("cancel", {"target": "bad target!"}),
    ("attach", {"volume_id": "v1", "vm_id": "x", "operation_id": "has space"}),
]


async def test_invalid_commands_are_rejected_once(volumed: Harness, sim: Simulator) -> None:
    import json

    before = len(sim.calls)
    ids = []
    for n, (op_type, body) in enumerate(INVALID):
        o = f"bad-{n}-{uuid.uuid4().hex[:6]}"
        ids.append(o)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await volumed.send(op_type, None, headers={"Nats-Msg-Id": o}, raw=raw)
    for o, (op_type, _) in zip(ids, INVALID, strict=True):
        event = await volumed.terminal(o)
        assert event["status"] == "rejected", event
        assert event["type"] == op_type
        assert event["error"]["code"] == "invalid_request"  # type: ignore[index]
        assert event["error"]["message"], event  # type: ignore[index]
    await asyncio.sleep(0.3)
    for o in ids:
        assert volumed.statuses(o) == ["rejected"], (o, volumed.statuses(o))
    # No CloudStack call for any of them (the health probe's reads aside).
    assert [c.command for c in sim.calls[before:] if not c.command.startswith("list")] == []
    # Still serving.
    await create_volume(volumed, sim)


async def test_rejection_names_the_field(volumed: Harness, sim: Simulator) -> None:
    o = op()
    await volumed.send(
        "create",
        {"operation_id": o, "name": "v", "size": GIB + 1, "disk_offering_id": "d", "zone_id": "z"},
    )
    event = await volumed.terminal(o)
    assert "size" in event["error"]["message"]  # type: ignore[index]


async def test_operations_on_one_volume_keep_their_order(volumed: Harness, sim: Simulator) -> None:
    sim.set_latency(0.05)
    volume_id = await create_volume(volumed, sim)
    vm = remote_vm(sim)
    ids = [op() for _ in range(6)]
    for n, o in enumerate(ids):
        if n % 2 == 0:
            await volumed.send("attach", {"operation_id": o, "volume_id": volume_id, "vm_id": vm})
        else:
            await volumed.send("detach", {"operation_id": o, "volume_id": volume_id})
    for o in ids:
        assert (await volumed.terminal(o))["status"] == "completed", volumed.events[o]
    mutations = [c.command for c in sim.calls if c.command in ("attachVolume", "detachVolume")]
    assert mutations == ["attachVolume", "detachVolume"] * 3


async def test_cancel(volumed: Harness, sim: Simulator) -> None:
    sim.set_latency(0.5)
    volume_id = await create_volume(volumed, sim)
    vm = remote_vm(sim)
    first, waiting, c1, c2, c3 = op(), op(), op(), op(), op()
    await volumed.send("attach", {"operation_id": first, "volume_id": volume_id, "vm_id": vm})
    await volumed.send("detach", {"operation_id": waiting, "volume_id": volume_id})
    await wait_for(lambda: "executing" in volumed.statuses(first))
    await wait_for(lambda: "pending" in volumed.statuses(waiting))
    await volumed.send("cancel", {"operation_id": c1, "target": waiting})
    await volumed.send("cancel", {"operation_id": c2, "target": first})
    await volumed.send("cancel", {"operation_id": c3, "target": "no-such-operation"})
    assert (await volumed.terminal(c1))["status"] == "completed"
    assert (await volumed.terminal(waiting))["status"] == "cancelled"
    assert volumed.statuses(waiting) == ["pending", "cancelled"]
    e2 = await volumed.terminal(c2)
    assert e2["status"] == "failed" and e2["error"]["code"] == "not_cancellable"  # type: ignore[index]
    e3 = await volumed.terminal(c3)
    assert e3["status"] == "failed" and e3["error"]["code"] == "not_found"  # type: ignore[index]
    assert (await volumed.terminal(first))["status"] == "completed"
    await asyncio.sleep(0.8)
    assert calls(sim, "detachVolume") == []  # the cancelled detach never ran


async def test_transient_failures_are_retried(volumed: Harness, sim: Simulator) -> None:
    sim.inject(Fault(kind="http", command="createVolume", status=503, count=2))
    sim.inject(Fault(kind="job", command="createVolume", count=1))
    o = op()
    await volumed.send("create", create_body(sim, o, "flaky"))
    event = await volumed.terminal(o)
    assert event["status"] == "completed", event
    assert len([v for v in sim.volumes.values() if v.name == "flaky"]) == 1


async def test_lost_answer_is_looked_up_not_resent(volumed: Harness, sim: Simulator) -> None:
    sim.inject(Fault(kind="accept_then_drop", command="createVolume", count=1))
    o = op()
    await volumed.send("create", create_body(sim, o, "lost-answer"))
    event = await volumed.terminal(o)
    assert event["status"] == "completed", event
    assert [v.id for v in sim.volumes.values() if v.name == "lost-answer"] == [event["volume_id"]]


async def test_cloudstack_down_gives_cloudstack_unavailable(
    volumed: Harness, sim: Simulator
) -> None:
    sim.inject(Fault(kind="drop", command="createVolume", count=100))
    o = op()
    await volumed.send("create", create_body(sim, o, "never"))
    event = await volumed.terminal(o)
    assert event["status"] == "failed"
    assert event["error"]["code"] == "cloudstack_unavailable"  # type: ignore[index]
    sim.clear_faults()


async def test_wrong_secret_is_unauthorized_and_never_shown(
    nats_server: NatsServer, database: Database, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-" + uuid.uuid4().hex
    settings = settings_for(nats_server, database, sim, cloudstack_secret=secret)
    caplog.set_level(logging.DEBUG)
    harness, task = await start_volumed(settings, ACTORS, sim)
    try:
        o = op()
        await harness.send("create", create_body(sim, o, "unauth"))
        event = await harness.terminal(o)
        assert event["status"] == "failed"
        assert event["error"]["code"] == "unauthorized"  # type: ignore[index]
        row = await harness.row(database, o, "failed")
        reply, _ = await harness.query("operation", {"operation_id": o})
    finally:
        await stop_volumed(harness, task)
    import json

    assert secret not in json.dumps(harness.events[o])
    assert secret not in json.dumps(row, default=str)
    assert secret not in json.dumps(reply)
    assert secret not in caplog.text


async def test_job_failure_that_is_not_transient_is_cloudstack_error(
    volumed: Harness, sim: Simulator
) -> None:
    sim.inject(Fault(kind="job", command="createVolume", errortext="storage pool is full"))
    o = op()
    await volumed.send("create", create_body(sim, o, "full"))
    event = await volumed.terminal(o)
    assert event["status"] == "failed"
    assert event["error"]["code"] == "cloudstack_error"  # type: ignore[index]
    assert "storage pool is full" in event["error"]["message"]  # type: ignore[index]
    assert len(calls(sim, "createVolume")) == 1  # not retried


async def test_queries_through_the_daemon(volumed: Harness, sim: Simulator) -> None:
    volume_id = await create_volume(volumed, sim, "queried")
    a = op()
    await volumed.send(
        "attach", {"operation_id": a, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    )
    await volumed.terminal(a)

    async def persisted() -> dict[str, object] | None:
        reply, code = await volumed.query("operation", {"operation_id": a})
        return reply if code is None and reply.get("status") == "completed" else None

    operation = await wait_for(persisted, 10)
    for key in (*EVENT_FIELDS, "request", "response", "created_at", "updated_at", "completed_at"):
        assert key in operation, key
    assert operation["request"]["volume_id"] == volume_id  # type: ignore[index]

    listed, code = await volumed.query("operations", {"volume_id": volume_id})
    assert code is None
    types = [o["type"] for o in listed["operations"]]  # type: ignore[union-attr, index]
    assert types == ["attach", "create"]  # newest first

    mapping, code = await volumed.query("mapping", {"volume_id": volume_id})
    assert code is None and mapping["device_path"] is None and mapping["vm_id"] == remote_vm(sim)
    vm_volumes, _ = await volumed.query("vm_volumes", {"vm_id": remote_vm(sim)})
    assert [v["volume_id"] for v in vm_volumes["volumes"]] == [volume_id]  # type: ignore[union-attr, index]

    _, code = await volumed.query("operation", {"operation_id": "no-such-op"})
    assert code == "404"
    _, code = await volumed.query("mapping", {"volume_id": str(uuid.uuid4())})
    assert code == "404"
    _, code = await volumed.query("operation", {"operation_id": "bad id!"})
    assert code == "400"
    _, code = await volumed.query("operations", {"limit": "many"})
    assert code == "400"


async def test_a_job_that_never_ends_fails_explicitly(
    nats_server: NatsServer, database: Database, sim: Simulator
) -> None:
    settings = settings_for(nats_server, database, sim, cloudstack_job_timeout=0.5)
    harness, task = await start_volumed(settings, ACTORS, sim)
    try:
        sim.set_latency(3600, command="createVolume")
        o = op()
        await harness.send("create", create_body(sim, o, "stuck"))
        event = await harness.terminal(o)
        assert event["status"] == "failed"
        assert event["error"]["code"] == "cloudstack_error"  # type: ignore[index]
        assert "has not finished" in event["error"]["message"]  # type: ignore[index]
        assert len(calls(sim, "createVolume")) == 1  # never sent again
    finally:
        sim.set_latency(0)
        await stop_volumed(harness, task)
