"""The client library against a real stack: nats-server, MariaDB, volumed in-process (executor
and persistence) and the CloudStack simulator."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from client import (
    BadRequest,
    Client,
    NotFound,
    OperationCancelled,
    OperationFailed,
    OperationRejected,
    Timeout,
    Unavailable,
)
from schemas.commands import AttachCommand, CreateCommand, DetachCommand
from schemas.common import GIB
from simulator import Fault, Simulator
from tests.conftest import Database, Harness, NatsServer, free_port, wait_for
from tests.test_lifecycle import create_body, remote_vm, sim, volumed  # noqa: F401  (fixtures)


@pytest.fixture
async def client(volumed: Harness, nats_server: NatsServer):  # type: ignore[no-untyped-def]  # noqa: F811
    async with await Client.connect(nats_server.url) as c:
        yield c


def create_command(sim: Simulator, name: str = "vol", op_id: str | None = None) -> CreateCommand:  # noqa: F811
    return CreateCommand(
        operation_id=op_id,
        name=name,
        size=GIB,
        disk_offering_id=sim.disk_offering_ids[0],
        zone_id=sim.zone_id,
    )


async def test_lifecycle_awaits_each_terminal_event(
    client: Client,
    sim: Simulator,  # noqa: F811
    database: Database,
) -> None:
    vm = remote_vm(sim)
    created = await client.create("data-1", 2 * GIB, sim.disk_offering_ids[0], sim.zone_id)
    assert created.status == "completed" and created.type == "create"
    volume_id = created.volume_id
    assert volume_id is not None and sim.volumes[volume_id].size == 2 * GIB

    attached = await client.attach(volume_id, vm)
    assert attached.status == "completed" and attached.vm_id == vm
    assert attached.device_path is None  # another VM than the local one

    # The queries see what the events said (read after write).
    mapping = await client.mapping(volume_id=volume_id)
    assert mapping.vm_id == vm and mapping.operation_id == attached.operation_id
    assert [m.volume_id for m in await client.vm_volumes(vm)] == [volume_id]
    record = await client.operation(attached.operation_id)
    assert record.status == "completed" and record.volume_id == volume_id
    attaches = await client.operations(type="attach", volume_id=volume_id)
    assert [o.operation_id for o in attaches] == [attached.operation_id]
    assert await client.operations(type="attach", status="failed", volume_id=volume_id) == []

    detached = await client.detach(volume_id)
    assert detached.status == "completed"
    with pytest.raises(NotFound):
        await client.mapping(volume_id=volume_id)
    deleted = await client.delete(volume_id)
    assert deleted.status == "completed" and volume_id not in sim.volumes


async def test_iterates_events_subscribed_before_the_publish(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    async with await client.send(create_command(sim)) as progress:
        statuses = [event.status async for event in progress]
        assert statuses == ["pending", "executing", "completed"]
        assert progress.last is not None and progress.last.operation_id == progress.operation_id
        result = await progress.result()
    assert result.volume_id in sim.volumes


async def test_operation_id_made_when_none_given_and_kept_when_given(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    made = await client.execute(create_command(sim))
    given = await client.execute(create_command(sim, op_id="my-op-1"))
    assert given.operation_id == "my-op-1"
    assert made.operation_id != given.operation_id
    assert (await client.operation(made.operation_id)).type == "create"


async def test_an_operation_that_already_ended(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    op_id = f"done-{uuid.uuid4().hex[:8]}"
    first = await client.execute(create_command(sim, "once", op_id))

    # Sent again: nothing new is done, and the latest event comes back.
    again = await client.execute(create_command(sim, "once", op_id))
    assert again.volume_id == first.volume_id
    assert [v.name for v in sim.volumes.values()].count("once") == 1

    # Followed later: its stored latest event, which is the terminal one.
    async with await client.follow(op_id) as progress:
        assert [e.status async for e in progress] == ["completed"]
        assert (await progress.result()).volume_id == first.volume_id


async def test_terminal_failures_raise_with_code_and_message(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(OperationFailed) as failed:
        await client.attach(unknown, remote_vm(sim))
    assert type(failed.value) is OperationFailed
    assert failed.value.status == "failed" and failed.value.code == "not_found"
    assert failed.value.message and failed.value.event.volume_id == unknown

    with pytest.raises(OperationRejected) as rejected:
        await client.create("bad", GIB + 1, sim.disk_offering_ids[0], sim.zone_id)
    assert rejected.value.code == "invalid_request" and "size" in rejected.value.message


async def test_a_cancelled_operation_raises_cancelled(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    volume_id = (await client.create("c", GIB, sim.disk_offering_ids[0], sim.zone_id)).volume_id
    assert volume_id is not None
    # The attach holds its volume's lane while CloudStack does not answer, so the detach
    # behind it stays pending until it is cancelled.
    sim.inject(Fault(kind="hang", command="attachVolume", seconds=3))
    attach = await client.send(AttachCommand(volume_id=volume_id, vm_id=remote_vm(sim)))
    detach = await client.send(DetachCommand(volume_id=volume_id))
    async with attach, detach:
        assert [e.status async for e in _first(attach, 2)] == ["pending", "executing"]
        assert [e.status async for e in _first(detach, 1)] == ["pending"]
        cancel = await client.cancel(detach.operation_id)
        assert cancel.status == "completed"
        with pytest.raises(OperationCancelled) as cancelled:
            await detach.result()
        assert (
            cancelled.value.code == "cancelled" and cancel.operation_id in cancelled.value.message
        )
        assert (await attach.result()).status == "completed"


async def _first(progress, n: int):  # type: ignore[no-untyped-def]
    """The first ``n`` events of ``progress``."""
    seen = 0
    async for event in progress:
        yield event
        seen += 1
        if seen == n:
            return


async def test_query_errors_are_exceptions(client: Client) -> None:
    with pytest.raises(NotFound):
        await client.operation("no-such-operation")
    with pytest.raises(NotFound):
        await client.mapping(device_path="/dev/vdzz")
    with pytest.raises(BadRequest) as bad:
        await client.operation("not an id!")
    assert "operation_id" in str(bad.value)
    with pytest.raises(BadRequest):
        await client.mapping()  # neither a volume nor a device
    with pytest.raises(BadRequest):
        await client.send(DetachCommand(operation_id="not an id!", volume_id="v"))
    health = await client.health()
    assert health.status in ("ok", "degraded", "down") and "database" in health.checks


async def test_an_operation_that_does_not_end_in_time(client: Client) -> None:
    async with await client.follow("never-sent") as progress:
        with pytest.raises(Timeout):
            await progress.result(timeout=0.2)
        assert progress.last is None


async def test_no_server_raises_unavailable() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(Unavailable) as e:
        await Client.connect(f"nats://user:s3cret@127.0.0.1:{port}", timeout=1)
    assert "s3cret" not in str(e.value)


async def test_a_server_without_volumed_is_unavailable(
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    async with await Client.connect(nats_server.url) as client:
        with pytest.raises(Unavailable):
            await client.send(create_command(sim))
        with pytest.raises(Unavailable):
            await client.health()


async def test_events_follow_every_operation(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    async with await client.events() as events:
        done = await client.execute(create_command(sim, "watched"))
        seen = []
        async for event in events:
            seen.append(event)
            if event.status == "completed":
                break
    assert [(e.operation_id, e.status) for e in seen] == [
        (done.operation_id, status) for status in ("pending", "executing", "completed")
    ]


class Door:
    """A TCP forwarder in front of nats-server that a test can shut (every connection
    through it cut, new ones refused) and open again: a client's network outage that the
    rest of the stack does not have."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Door:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shut()
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def shut(self) -> None:
        self.open = False
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def test_events_published_while_disconnected_are_caught_up(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    async with Door(nats_server.port) as door, await Client.connect(door.url) as client:
        # CloudStack is slow to answer, so the create is still executing when the door shuts.
        sim.inject(Fault(kind="hang", command="createVolume", seconds=2))
        async with await client.send(create_command(sim, "across")) as progress:
            assert [e.status async for e in _first(progress, 2)] == ["pending", "executing"]
            door.shut()
            # The terminal event is published while this client cannot receive it.
            done = await volumed.terminal(progress.operation_id)
            assert done["status"] == "completed"
            door.open = True
            result = await progress.result(timeout=30)
            assert result.volume_id == done["volume_id"]


async def test_watching_every_event_counts_the_gaps(
    volumed: Harness,  # noqa: F811
    nats_server: NatsServer,
    sim: Simulator,  # noqa: F811
) -> None:
    async with (
        Door(nats_server.port) as door,
        await Client.connect(door.url) as client,
        await client.events() as events,
    ):
        door.shut()
        await volumed.send("create", create_body(sim, "unseen", "unseen"))
        assert (await volumed.terminal("unseen"))["status"] == "completed"
        door.open = True
        await wait_for(lambda: events.gaps == 1)  # counted once the connection is back
        await client.bus.flush()  # and subscribed again
        await volumed.send("create", create_body(sim, "seen", "seen"))
        async for event in events:
            assert event.operation_id == "seen"  # none of the one sent while shut
            if event.status == "completed":
                break
        assert events.gaps == 1


async def test_the_same_id_for_another_volume_is_rejected_for_its_sender_only(
    client: Client,
    sim: Simulator,  # noqa: F811
) -> None:
    """One id sent for two volumes: the second sender gets `conflict`, the first follows its
    own operation to its end (not the other command's rejection)."""
    op_id, here, there = f"twice-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), str(uuid.uuid4())
    async with (
        await client.send(DetachCommand(operation_id=op_id, volume_id=here)) as first,
        await client.send(DetachCommand(operation_id=op_id, volume_id=there)) as second,
    ):
        with pytest.raises(OperationRejected) as rejected:
            await second.result(10)
        assert rejected.value.code == "conflict" and rejected.value.event.volume_id == there
        with pytest.raises(OperationFailed) as failed:
            await first.result(10)
        assert type(failed.value) is OperationFailed and failed.value.code == "not_found"
        assert failed.value.event.volume_id == here
    # The database keeps the operation, not the rejection.
    operation = await client.operation(op_id)
    assert (operation.status, operation.volume_id) == ("failed", here)
