"""The executor's promises, tried from outside through the running daemon: any command body
gets one outcome and is never redelivered, events never go backwards, a long command is
delivered once, a terminal event is never lost, records expire, attaches in flight are
announced."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import ConsumerConfig

from actors.executor import ExecutorActor
from bus import Bus
from bus.connection import StoredMessage
from bus.topology import (
    ATTACHING_BUCKET,
    COMMANDS,
    DEAD_LETTERS,
    EVENTS,
    EXECUTOR,
    OPERATIONS_BUCKET,
    TOPOLOGY,
    command_subject,
    event_subject,
    topology_for,
)
from schemas.commands import MAX_COMMAND_BYTES
from schemas.common import STATUS_RANK, TERMINAL
from schemas.config import Settings
from schemas.internal import AttachInFlight, OpRecord
from simulator import Simulator
from tests import test_lifecycle
from tests.conftest import Database, Harness, NatsServer, start_volumed, stop_volumed, wait_for
from tests.test_lifecycle import calls, create_body, create_volume, op, remote_vm, settings_for

ACTORS = ["persistence", "executor"]


# The lifecycle tests' fixtures: a simulator, and volumed (persistence and executor) on it.
sim = test_lifecycle.sim
volumed = test_lifecycle.volumed


async def executor_consumer(v: Harness) -> Any:
    return await v.bus.js.consumer_info(COMMANDS.name, EXECUTOR.durable)  # type: ignore[attr-defined]


async def dead_letters(v: Harness) -> int:
    info = await v.bus.js.stream_info(DEAD_LETTERS.name)  # type: ignore[attr-defined]
    return int(info.state.messages)


async def stored_events(v: Harness, op_id: str) -> list[dict[str, Any]]:
    """The operation's events as the events stream holds them, in order."""
    js = v.bus.js  # type: ignore[attr-defined]
    sub = await js.subscribe(event_subject(op_id), ordered_consumer=True)
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                return out
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()


# -- 1. any body: exactly one outcome, never a redelivery ------------------------------------

FIELDS = {
    "create": {"name": "n", "size": 1 << 30, "disk_offering_id": "do-1", "zone_id": "z-1"},
    "attach": {"volume_id": "v-1", "vm_id": "vm-1", "as_root": False},
    "detach": {"volume_id": "v-1"},
    "delete": {"volume_id": "v-1"},
    "cancel": {"target": "t-1"},
    "resize": {"volume_id": "v-1", "size": 1 << 31, "shrink_ok": False},
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**20, max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
odd_ids = st.one_of(
    st.integers(),
    st.booleans(),
    st.none(),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(["", "a b", "x" * 65, "é", "a.b", "*", ">", "a/b"]),
    st.floats(allow_nan=False),
)
op_types = st.sampled_from(sorted(FIELDS))


@st.composite
def wrong_field(draw: st.DrawFn) -> tuple[str, bytes]:
    """A command of one type with one field (or the operation id) of a wrong type."""
    op_type = draw(op_types)
    body: dict[str, Any] = dict(FIELDS[op_type])
    field = draw(st.sampled_from([*body, "operation_id"]))
    body[field] = draw(odd_ids if field == "operation_id" else json_values)
    return op_type, json.dumps(body).encode()


def padded(op_type: str, size: int) -> bytes:
    """A well-formed command of exactly ``size`` bytes (an unknown field pads it)."""
    body = {**FIELDS[op_type], "pad": ""}
    base = len(json.dumps(body).encode())
    body["pad"] = "p" * (size - base)
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


bodies = st.lists(
    st.one_of(
        st.tuples(op_types, json_values.map(lambda v: json.dumps(v).encode())),
        wrong_field(),
        st.tuples(op_types, st.binary(max_size=64)),
        st.tuples(op_types, st.sampled_from([b"", b"  ", b"\n", b"{", b"\xff\xfe", b"[" * 5000])),
        st.tuples(
            st.sampled_from(["detach", "delete"]),
            st.sampled_from([MAX_COMMAND_BYTES - 1, MAX_COMMAND_BYTES, MAX_COMMAND_BYTES + 1]).map(
                lambda n: padded("detach", n)
            ),
        ),
    ),
    min_size=10,
    max_size=30,
)


@settings(
    max_examples=4,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=bodies)
async def test_any_command_body_gets_exactly_one_outcome(
    volumed: Harness, drawn: list[tuple[str, bytes]]
) -> None:
    # Plus, every time: a body far over the limit (but under the server's 1 MiB payload).
    drawn = [*drawn, ("detach", padded("detach", 900 * 1024))]
    expected: dict[str, bytes] = {}
    for op_type, data in drawn:
        ack = await volumed.bus.js.publish(f"volume.cmd.{op_type}", data)  # type: ignore[attr-defined]
        op_id = ExecutorActor.operation_id_of(data, {}, ack.seq)
        assert op_id not in expected  # every body names another operation
        expected[op_id] = data
    for op_id in expected:
        await volumed.terminal(op_id, timeout=30)
    await asyncio.sleep(0.5)  # anything extra would have come by now
    for op_id, data in expected.items():
        statuses = volumed.statuses(op_id)
        assert statuses == ["rejected"] or (
            statuses[:2] == ["pending", "executing"]
            and len(statuses) == 3
            and statuses[2] in ("completed", "failed", "cancelled")
        ), (data[:200], statuses)
        if len(data) > MAX_COMMAND_BYTES:
            event = volumed.events[op_id][0]
            assert event["error"]["code"] == "invalid_request"  # type: ignore[index]
            message = event["error"]["message"]  # type: ignore[index]
            assert f"{len(data)} bytes" in message and str(MAX_COMMAND_BYTES) in message
            # Only an excerpt of the body is kept, in the event and in the record.
            assert len(json.dumps(event)) < 4 * 1024
    ops = await volumed.bus.bucket(OPERATIONS_BUCKET, msgspec.Raw)  # type: ignore[attr-defined]
    for op_id in expected:
        got = await ops.get(op_id)
        assert got is not None and len(bytes(got[0])) < 256 * 1024

    async def settled() -> bool:
        info = await executor_consumer(volumed)
        return bool(info.num_ack_pending == 0 and info.num_pending == 0)

    await wait_for(settled, 10)
    delivered = (await executor_consumer(volumed)).delivered
    assert delivered.consumer_seq == delivered.stream_seq  # nothing was delivered twice
    assert await dead_letters(volumed) == 0


# -- 7. a re-sent command re-publishes the latest event, never an older one -------------------


@pytest.mark.parametrize("executors", [1, 2])
async def test_resent_commands_never_send_a_status_backwards(
    volumed: Harness, sim: Simulator, executors: int
) -> None:
    """With one executor neither a subscriber nor the stream sees a status go backwards; with
    two (another process's executor takes some copies) the stream never does."""
    second = None
    if executors == 2:
        again = msgspec.structs.replace(volumed.settings, instance="second")  # type: ignore[type-var]
        second = await start_volumed(again, ["executor"], sim)
    try:
        volume_id = await create_volume(volumed, sim)
        sim.set_latency(0.3, "attachVolume")
        sim.set_latency(0.3, "detachVolume")
        vm = remote_vm(sim)
        for _ in range(3):
            # The detach waits for the attach (same volume), then runs; copies of both
            # arrive all the while, across each of their status changes.
            attach = {"operation_id": op(), "volume_id": volume_id, "vm_id": vm}
            detach = {"operation_id": op(), "volume_id": volume_id}
            await volumed.send("attach", attach)
            await volumed.send("detach", detach)
            sent = await resend_until_done(volumed, [("attach", attach), ("detach", detach)])
            assert sent > 100
            for op_id in (attach["operation_id"], detach["operation_id"]):
                stored = [e["status"] for e in await stored_events(volumed, str(op_id))]
                assert is_forward(stored), stored
                # Per-volume order holds across processes: the detach waits for the attach.
                assert stored[-1] == "completed", stored
                if executors == 1:
                    # (Across processes a core subscriber may rarely see an older copy:
                    # the server hands a refused publish-if-last to it too.)
                    assert is_forward(volumed.statuses(op_id)), volumed.statuses(op_id)
        assert len(calls(sim, "detachVolume")) == 3
    finally:
        if second is not None:
            await stop_volumed(*second)


async def taken(v: Harness) -> bool:
    return bool((await executor_consumer(v)).num_pending <= 96)


def is_forward(statuses: list[Any]) -> bool:
    ranks = [STATUS_RANK[str(s)] for s in statuses]
    return ranks == sorted(ranks)


async def resend_until_done(v: Harness, commands: list[tuple[str, dict[str, Any]]]) -> int:
    """Send copies of the commands in bursts until the last one has ended; a burst goes
    when the executors have taken the one before."""
    sent = 0
    last = str(commands[-1][1]["operation_id"])
    while not TERMINAL & set(map(str, v.statuses(last))):
        await asyncio.gather(*(v.send(t, body) for t, body in commands * 96))
        sent += 96 * len(commands)
        await wait_for(lambda: taken(v), 30, interval=0.005)

    await asyncio.wait_for(v.terminal(last), 30)
    return sent


# -- 9. a long command is delivered once; provisioning updates an old consumer ---------------


async def test_a_long_command_is_delivered_once(volumed: Harness, sim: Simulator) -> None:
    volume_id = await create_volume(volumed, sim)
    sim.set_latency(5.0, "attachVolume")
    attach = op()
    body = {"operation_id": attach, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    await volumed.send("attach", body)
    assert (await volumed.terminal(attach, timeout=30))["status"] == "completed"
    info = await executor_consumer(volumed)
    # One delivery per command: deliveries (consumer sequence) = commands (stream sequence).
    assert info.delivered.consumer_seq == info.delivered.stream_seq
    assert len(calls(sim, "attachVolume")) == 1
    assert volumed.statuses(attach) == ["pending", "executing", "completed"]


async def test_provisioning_updates_a_consumer_an_older_volumed_made(
    nats_server: NatsServer,
) -> None:
    bus = await Bus.connect(nats_server.url, "old")
    try:
        await bus.provision(TOPOLOGY.__class__(streams=TOPOLOGY.streams))
        # What the previous code provisioned: a server-side BackOff whose first step (1 s)
        # was the real ack wait of a running command.
        old = ConsumerConfig(
            durable_name=EXECUTOR.durable,
            ack_wait=30.0,
            max_deliver=8,
            backoff=[1.0, 2.0, 5.0, 10.0, 30.0, 60.0],
            max_ack_pending=EXECUTOR.max_ack_pending,
        )
        await bus.js.add_consumer(COMMANDS.name, old)
        await bus.provision(TOPOLOGY)
        config = (await bus.js.consumer_info(COMMANDS.name, EXECUTOR.durable)).config
        assert not config.backoff
        assert config.ack_wait == EXECUTOR.ack_wait and config.max_deliver == EXECUTOR.max_deliver
    finally:
        await bus.close()


# -- 10. a terminal event is never lost ------------------------------------------------------


async def test_a_cancelled_event_whose_publish_failed_goes_out_later(
    volumed: Harness, sim: Simulator, database: Database
) -> None:
    volume_id = await create_volume(volumed, sim)
    sim.set_latency(3.0, "attachVolume")
    attach, target, cancel = op(), op(), op()
    await volumed.send(
        "attach", {"operation_id": attach, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    )
    await wait_for(lambda: "executing" in volumed.statuses(attach))
    await volumed.send("detach", {"operation_id": target, "volume_id": volume_id})
    await wait_for(lambda: volumed.statuses(target) == ["pending"])
    # The server refuses to store the target's events for a while: the events stream takes
    # every other operation's subject, not the target's.
    js = volumed.bus.js  # type: ignore[attr-defined]
    config = (await js.stream_info(EVENTS.name)).config
    every = list(config.subjects)
    others = [event_subject(o) for o in (attach, cancel)]
    config.subjects = others
    await js.update_stream(config)
    try:
        await volumed.send("cancel", {"operation_id": cancel, "target": target})
        ops = await volumed.bus.bucket(OPERATIONS_BUCKET, OpRecord)  # type: ignore[attr-defined]

        async def cancelled() -> bool:
            got = await ops.get(target)
            return got is not None and got[0].status == "cancelled"

        await wait_for(cancelled, 15)
        # Its one publish is failing (nothing stores that subject): the stream's last event
        # of the target is still its pending one.
        last = await volumed.bus.last_message(EVENTS.name, event_subject(target))  # type: ignore[attr-defined]
        assert json.loads(last)["status"] == "pending"
    finally:
        config.subjects = every
        await js.update_stream(config)
    assert (await volumed.terminal(cancel, timeout=30))["status"] == "completed"
    await volumed.terminal(attach, timeout=30)

    async def stored_terminal() -> bool:
        events = await stored_events(volumed, target)
        return bool(events) and events[-1]["status"] == "cancelled"

    await wait_for(stored_terminal, 20, interval=0.5)
    row = await volumed.row(database, target, "cancelled", timeout=20)
    assert row["status"] == "cancelled"


# -- 14. records expire; attaches in flight are announced ------------------------------------


async def test_operation_records_expire_after_the_retention(
    nats_server: NatsServer, database: Database, sim: Simulator
) -> None:
    bus = await Bus.connect(nats_server.url, "retention")
    try:
        await bus.provision(TOPOLOGY)  # an existing bucket, the default retention
        short = settings_for(nats_server, database, sim, operation_retention=2.0)
        await bus.provision(topology_for(short))
        kv = await bus.js.stream_info(f"KV_{OPERATIONS_BUCKET.name}")
        assert kv.config.max_age == 2.0
    finally:
        await bus.close()
    v, task = await start_volumed(short, ACTORS, sim)
    try:
        c = op()
        await v.send("create", create_body(sim, c))
        assert (await v.terminal(c))["status"] == "completed"
        ops = await v.bus.bucket(OPERATIONS_BUCKET, OpRecord)  # type: ignore[attr-defined]
        assert await ops.get(c) is not None

        async def expired() -> bool:
            return await ops.get(c) is None

        await wait_for(expired, 15, interval=0.2)
        # Past the retention the id is new again: the idempotency horizon.
        v.events.pop(c)
        await v.send("create", create_body(sim, c))
        assert (await v.terminal(c))["status"] == "completed"
        assert v.statuses(c)[-2:] == ["executing", "completed"]
        assert len(calls(sim, "createVolume")) == 2
    finally:
        await stop_volumed(v, task)


async def test_an_attach_in_flight_is_announced_until_it_ends(
    volumed: Harness, sim: Simulator
) -> None:
    volume_id = await create_volume(volumed, sim)
    sim.set_latency(1.5, "attachVolume")
    attach, vm = op(), remote_vm(sim)
    attaching = await volumed.bus.bucket(ATTACHING_BUCKET, AttachInFlight)  # type: ignore[attr-defined]
    await volumed.send("attach", {"operation_id": attach, "volume_id": volume_id, "vm_id": vm})

    async def announced() -> AttachInFlight | None:
        got = await attaching.get(attach)
        return got[0] if got is not None and got[0].started_at is not None else None

    entry = await wait_for(announced, 10)
    assert entry.volume_id == volume_id and entry.vm_id == vm and entry.accepted_at
    assert volumed.statuses(attach)[-1] == "executing"
    assert (await volumed.terminal(attach, timeout=20))["status"] == "completed"
    # (Deleted right after its terminal record and event: a reader may be a moment early.)
    assert await wait_for(lambda: _gone(attaching, attach), 5)


async def _gone(attaching: Any, key: str) -> bool:
    return await attaching.get(key) is None


def test_settings_retention_default_is_the_events_age() -> None:
    assert Settings().operation_retention == EVENTS.max_age == OPERATIONS_BUCKET.ttl


async def test_a_resent_copy_given_up_never_fails_the_running_original(
    volumed: Harness, sim: Simulator
) -> None:
    """A re-sent copy of a running command whose own deliveries ran out (its re-publish kept
    failing) ends nothing: the original runs on to its own end."""
    volume_id = await create_volume(volumed, sim)
    sim.set_latency(2.0, "attachVolume")
    attach = op()
    body = {"operation_id": attach, "volume_id": volume_id, "vm_id": remote_vm(sim)}
    await volumed.send("attach", body)
    await wait_for(lambda: "executing" in volumed.statuses(attach))
    executor = volumed.supervisor.actors["executor"]  # type: ignore[attr-defined]
    ops = await volumed.bus.bucket(OPERATIONS_BUCKET, OpRecord)  # type: ignore[attr-defined]
    got = await ops.get(attach)
    assert got is not None
    # What the last delivery of a copy (a later stream sequence) does when it fails for good:
    # nothing yet (it is left for later), never failing the operation.
    copy = StoredMessage(
        command_subject("attach"), json.dumps(body).encode(), {}, got[0].stream_seq + 1
    )
    with pytest.raises(RuntimeError, match="still running"):
        await executor._fail_for_good(copy, "a copy failed")
    end = await volumed.terminal(attach, timeout=30)
    assert end["status"] == "completed", end
    assert volumed.statuses(attach).count("failed") == 0
