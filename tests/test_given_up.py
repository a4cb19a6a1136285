"""A command whose deliveries run out (its executors kept dying, or kept failing) is given up
one way: the executor's consumer calls its ``on_give_up`` (ExecutorActor.give_up), which ends
the operation ``failed`` ``internal`` with one event, and then dead-letters the command,
instead of leaving it open for ever. Real NATS: the consumer, the server's redeliveries and
the executor's records are the real ones; only the handler stands in for a process that
dies (or fails) during each delivery, with deliveries that run out in a second."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from actors.executor import ExecutorActor
from actors.executor.cloudstack import CloudStack
from bus import Abandon, Bus, Consumer, Delivery
from bus.topology import DEAD_LETTERS, EXECUTOR, OPERATIONS_BUCKET, TOPOLOGY, command_subject
from schemas.config import Settings
from schemas.events import OperationEvent
from schemas.internal import CloudStackCredentials, OpRecord
from tests.conftest import NatsServer, wait_for

# The executor's consumer, as provisioned, with deliveries that run out quickly: a dead
# process's delivery comes back after 0.3 s, a failed one after 0.1 s; the third counted
# delivery is given up without running.
SPEC = replace(EXECUTOR, ack_wait=0.3, give_up_after=2, nak_delays=(0.1,))


@asynccontextmanager
async def executor_consuming(
    nats_server: NatsServer,
    handler: Callable[[ExecutorActor, Delivery], Awaitable[None]],
    cloud: CloudStack | None = None,
) -> AsyncIterator[tuple[Bus, ExecutorActor, list[dict[str, object]]]]:
    """An executor whose consumer (SPEC) runs ``handler`` and gives up through the executor,
    as ExecutorActor.run wires it; the events of every operation, as published."""
    bus = await Bus.connect(nats_server.url, "given-up")
    consumer: Consumer | None = None
    task: asyncio.Task[None] | None = None
    try:
        await bus.provision(TOPOLOGY)
        await bus.js.delete_consumer(EXECUTOR.stream, EXECUTOR.durable)
        await bus.provision(replace(TOPOLOGY, streams=(), buckets=(), consumers=(SPEC,)))
        settings = Settings(
            nats_url=nats_server.url,
            cloudstack_endpoint="http://127.0.0.1:9/client/api",
            cloudstack_key="k",
            cloudstack_secret="s",
            vm_id="vm-here",
        )
        executor = ExecutorActor(bus, settings, "t", cloud=cloud)
        await executor.open()
        events: list[dict[str, object]] = []

        async def on_event(_s: str, data: bytes, _r: str | None) -> None:
            events.append(json.loads(data))

        await bus.subscribe("volume.events.>", on_event)

        async def handle(d: Delivery) -> None:
            await handler(executor, d)

        consumer = Consumer(
            bus,
            SPEC,
            handle,
            concurrency=4,
            on_give_up=executor.give_up,
            counted=executor.counted,
        )
        task = asyncio.create_task(consumer.run(grace=0.5))
        yield bus, executor, events
    finally:
        if consumer is not None:
            consumer.stop()
        if task is not None:
            await task
        await bus.close()


async def dead_letters(bus: Bus) -> int:
    return (await bus.js.stream_info(DEAD_LETTERS.name)).state.messages


async def test_a_command_whose_process_dies_each_time_fails_its_operation(
    nats_server: NatsServer,
) -> None:
    """Each delivery runs the operation (OpRecord.runs) and its process dies: once the runs
    reach give_up_after, the next delivery is given up without running; the operation ends
    failed internal with one event, and the command is dead-lettered once."""
    given: list[Delivery] = []

    async def dies(executor: ExecutorActor, d: Delivery) -> None:
        got = await executor.records.ops.get("stuck-1")
        assert got is not None
        record, revision = got
        record.runs += 1  # this delivery ran it (as the real handler saves it)...
        await executor.records.ops.update("stuck-1", record, revision)
        given.append(d)
        raise Abandon("...and its process died")  # redelivered after the ack wait

    async with executor_consuming(nats_server, dies) as (bus, executor, events):
        ops = await bus.bucket(OPERATIONS_BUCKET, OpRecord)
        body = {"operation_id": "stuck-1", "volume_id": "v-1"}
        # The record as the first process left it: claimed, executing (its command is
        # published only once it exists, so that no delivery claims it first).
        executing = OperationEvent(
            operation_id="stuck-1",
            type="delete",
            status="executing",
            volume_id="v-1",
            at="2026-01-01T00:00:00Z",
        )
        seq = (await bus.js.stream_info(EXECUTOR.stream)).state.last_seq + 1
        await ops.create(
            "stuck-1",
            OpRecord(
                operation_id="stuck-1",
                type="delete",
                status="executing",
                stream_seq=seq,
                volume_id="v-1",
                last_event=executing,
                claimed_on=1,
            ),
        )
        assert await bus.publish(command_subject("delete"), body) == seq
        await wait_for(lambda: events, timeout=15)
        assert events[-1]["status"] == "failed"
        assert events[-1]["error"]["code"] == "internal"  # type: ignore[index]
        assert "delivered 3 times" in events[-1]["error"]["message"]  # type: ignore[index]
        assert len(given) == 2  # the third delivery was given up without running
        record = await ops.get("stuck-1")
        assert record is not None and record[0].status == "failed"
        await wait_for(lambda: dead_letters(bus), timeout=5)
        # Given up once more (its term lost, say): nothing new.
        await executor.give_up(given[-1], "again")
        await asyncio.sleep(0.5)
        assert [e["status"] for e in events] == ["failed"]
        assert await dead_letters(bus) == 1


async def test_a_command_that_fails_before_its_claim_ends_with_one_event(
    nats_server: NatsServer,
) -> None:
    """Every delivery fails before the command could claim its operation id: its last one
    is given up, and the operation is claimed then, as failed internal, with one event."""
    failures: list[int] = []

    async def fails(_executor: ExecutorActor, d: Delivery) -> None:
        failures.append(d.num_delivered)
        raise RuntimeError("the operations bucket did not answer")

    async with executor_consuming(nats_server, fails) as (bus, _executor, events):
        body = {"operation_id": "never-1", "volume_id": "v-1"}
        seq = await bus.publish(command_subject("delete"), body)
        await wait_for(lambda: events, timeout=15)
        assert failures == [1, 2]
        assert [e["status"] for e in events] == ["failed"]
        assert events[0]["operation_id"] == "never-1"
        assert events[0]["error"]["code"] == "internal"  # type: ignore[index]
        assert "the operations bucket did not answer" in events[0]["error"]["message"]  # type: ignore[index]
        ops = await bus.bucket(OPERATIONS_BUCKET, OpRecord)
        record = await ops.get("never-1")
        assert record is not None
        assert (record[0].status, record[0].stream_seq) == ("failed", seq)
        assert await wait_for(lambda: dead_letters(bus), timeout=5) == 1


class DiesReading(CloudStack):
    """A CloudStack whose volume read never returns: the process handling it dies there
    (Abandon stands in for the kill: nothing more is done, the delivery comes back after the
    ack wait)."""

    def __init__(self) -> None:
        super().__init__(self._no_credentials)
        self.reads = 0

    @staticmethod
    async def _no_credentials() -> CloudStackCredentials:
        return CloudStackCredentials()

    def with_credentials(self, credentials: CloudStackCredentials) -> CloudStack:
        return self

    async def volume(self, volume_id: str) -> dict[str, object] | None:
        self.reads += 1
        raise Abandon("its process died reading CloudStack")


async def test_a_command_whose_process_dies_before_its_first_write_is_given_up(
    nats_server: NatsServer,
) -> None:
    """A delete's first step reads CloudStack before anything is written (its start goes
    with its first write): a process that dies there every time must still count, so a
    redelivered command starts (saving ``runs``) before that read; the command is given up
    after give_up_after such deliveries instead of coming back for ever."""
    cloud = DiesReading()

    async def real(executor: ExecutorActor, d: Delivery) -> None:
        await executor.handle(d)

    async with executor_consuming(nats_server, real, cloud) as (bus, _executor, events):
        body = {"operation_id": "dies-1", "volume_id": "v-1"}
        await bus.publish(command_subject("delete"), body)
        await wait_for(lambda: any(e["status"] == "failed" for e in events), timeout=15)
        statuses = [e["status"] for e in events]
        assert statuses == ["pending", "executing", "failed"], statuses
        assert events[-1]["error"]["code"] == "internal"  # type: ignore[index]
        # The first delivery (deferred start: nothing written) and two counted ones.
        assert cloud.reads == 3, cloud.reads
        await wait_for(lambda: dead_letters(bus), timeout=5)
