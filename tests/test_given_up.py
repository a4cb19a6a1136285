"""A command the server gave up on (its deliveries ran out while executors kept dying) ends
its operation with `internal` and is dead-lettered, instead of staying open for ever."""

from __future__ import annotations

import json

from actors.executor import ExecutorActor
from bus import Bus
from bus.topology import DEAD_LETTERS, OPERATIONS_BUCKET, TOPOLOGY, command_subject
from schemas.config import Settings
from schemas.events import OperationEvent
from schemas.internal import GivenUpAdvisory, OpRecord
from tests.conftest import NatsServer, wait_for


async def test_given_up_command_fails_its_operation(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, "given-up")
    try:
        await bus.provision(TOPOLOGY)
        executor = ExecutorActor(bus, Settings(nats_url=nats_server.url), "t")
        await executor.open()
        body = {"operation_id": "stuck-1", "volume_id": "v-1"}
        seq = await bus.publish(command_subject("delete"), body)
        # The state a process leaves when it dies mid-operation on each delivery.
        ops = await bus.bucket(OPERATIONS_BUCKET, OpRecord)
        executing = OperationEvent(
            operation_id="stuck-1",
            type="delete",
            status="executing",
            volume_id="v-1",
            at="2026-01-01T00:00:00Z",
        )
        await ops.create(
            "stuck-1",
            OpRecord(
                operation_id="stuck-1",
                type="delete",
                status="executing",
                stream_seq=seq,
                volume_id="v-1",
                last_event=executing,
            ),
        )
        events: list[dict[str, object]] = []

        async def on_event(_s: str, data: bytes, _r: str | None) -> None:
            events.append(json.loads(data))

        await bus.subscribe("volume.events.stuck-1", on_event)
        await executor.end_given_up(GivenUpAdvisory(stream_seq=seq, deliveries=8))
        await wait_for(lambda: events)
        assert events[-1]["status"] == "failed"
        assert events[-1]["error"]["code"] == "internal"  # type: ignore[index]
        assert "given up after 8 deliveries" in events[-1]["error"]["message"]  # type: ignore[index]
        record = await ops.get("stuck-1")
        assert record is not None and record[0].status == "failed"
        dead = await bus.js.stream_info(DEAD_LETTERS.name)
        assert dead.state.messages == 1
        # Once more (the advisory redelivered): nothing new.
        await executor.end_given_up(GivenUpAdvisory(stream_seq=seq, deliveries=8))
        assert [e["status"] for e in events] == ["failed"]
        assert (await bus.js.stream_info(DEAD_LETTERS.name)).state.messages == 1
    finally:
        await bus.close()
