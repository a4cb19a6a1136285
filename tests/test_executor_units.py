"""Unit tests of two pieces of the executor's pure logic, against fakes: ``mutate``
(actors/executor/operations.py: one CloudStack mutation, sent exactly once) and
``VolumeOrder`` (actors/executor/order.py: per-volume order read from the command stream).

The house rule "never mock NATS or the database" is about integration tests, which run
these same pieces end to end (tests/test_order.py, test_crash.py, test_takeover.py...).
Here the fakes implement exactly what each unit uses, nothing more: for ``mutate`` a
Context (``settings``, ``record``, ``save``, ``hold``) and a CloudStack
(``clock.now``, ``start``, ``wait``, ``volume``); for ``VolumeOrder`` a bus (``stored``,
``consumer_progress``, ``last_stored``) and an ops bucket (``get``). They run in
milliseconds and each names one rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
import pytest

from actors.executor import order as order_module
from actors.executor.cloudstack import CloudStackError, Job
from actors.executor.operations import Context, mutate
from actors.executor.order import Identity, VolumeOrder
from bus import Bucket, Bus
from bus.connection import ConsumerProgress, StoredMessage
from bus.topology import EVENTS, EXECUTOR, event_subject
from schemas.config import Settings
from schemas.internal import OpRecord, Phase

# -- mutate ----------------------------------------------------------------------------------

SENT_AT = 1000.0  # CloudStack's clock, as the fake tells it
DONE = {"volume": {"id": "v1", "virtualmachineid": "vm1"}}


class FakeClock:
    def now(self) -> float:
        return SENT_AT


class FakeCloud:
    """Scripted answers: each ``start``/``wait`` takes the next of its list (an exception is
    raised). ``log`` keeps every call, with the record as last saved when a mutation went."""

    def __init__(self, ctx: FakeContext) -> None:
        self.clock = FakeClock()
        self.ctx = ctx
        self.starts: list[Job | Exception] = []
        self.waits: list[dict[str, Any] | Exception] = []
        self.volumes: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, Any]] = []
        self.saved_when_sent: list[OpRecord] = []

    async def start(self, command: str, **params: Any) -> Job:
        self.log.append(("start", command))
        self.saved_when_sent.append(self.ctx.saves[-1])
        answer = self.starts.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def wait(self, job_id: str, *, max_interval: float, deadline: float) -> dict[str, Any]:
        self.log.append(("wait", job_id))
        answer = self.waits.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def volume(self, volume_id: str) -> dict[str, Any] | None:
        self.log.append(("volume", volume_id))
        return self.volumes.get(volume_id)


class FakeContext:
    def __init__(self, record: OpRecord) -> None:
        # Retries at once: the backoff's length is not what these tests are about.
        self.settings = Settings(cloudstack_retry_backoff=0.001, cloudstack_retry_cap=0.001)
        self.record = record
        self.cloud = FakeCloud(self)
        self.saves: list[OpRecord] = []  # a copy of the record at each save
        self.holds = 0

    async def save(self) -> None:
        copy = msgspec.json.decode(msgspec.json.encode(self.record), type=OpRecord)
        self.saves.append(copy)

    def hold(self) -> None:
        self.holds += 1


def _record(**fields: Any) -> OpRecord:
    return OpRecord(operation_id="op1", type="attach", status="executing", stream_seq=1, **fields)


class LookUp:
    """``already_done``: answers ``found`` (None: the mutation did not take effect)."""

    def __init__(self, found: dict[str, Any] | None) -> None:
        self.found = found
        self.calls = 0

    async def __call__(self) -> dict[str, Any] | None:
        self.calls += 1
        return self.found


async def _attach(ctx: FakeContext, look_up: Callable[[], Awaitable[dict[str, Any] | None]]) -> Any:
    return await mutate(
        cast(Context, ctx),
        Phase.ATTACH,
        "attachVolume",
        {"id": "v1", "virtualmachineid": "vm1"},
        look_up,
    )


async def test_mutation_sent_is_saved_before_the_send_then_the_job_id() -> None:
    ctx = FakeContext(_record())
    ctx.cloud.starts = [Job("j1")]
    ctx.cloud.waits = [DONE]
    look_up = LookUp(None)

    assert await _attach(ctx, look_up) == DONE

    assert [c[0] for c in ctx.cloud.log] == ["start", "wait"]
    (when_sent,) = ctx.cloud.saved_when_sent
    assert when_sent.phase == Phase.ATTACH
    assert when_sent.mutation_sent == SENT_AT and when_sent.job_id is None
    # The job id is saved as soon as it is known, before the job is awaited.
    assert ctx.saves[-1].job_id == "j1"
    assert look_up.calls == 0  # never sent before: nothing to look up
    rec = ctx.record
    assert rec.results[Phase.ATTACH] == DONE
    assert rec.job_id is None and rec.mutation_sent is None
    assert ctx.holds >= 2  # checked before the save and again before the send


async def test_a_phase_done_before_a_restart_is_not_sent_again() -> None:
    ctx = FakeContext(_record(phase=Phase.ATTACH, results={Phase.ATTACH: DONE}))
    assert await _attach(ctx, LookUp(None)) == DONE
    assert ctx.cloud.log == [] and ctx.saves == []


async def test_a_restart_after_the_send_looks_up_instead_of_sending_again() -> None:
    """Restarted with "mutation sent" and no job id (the answer was lost): the volume's
    pending job is waited for, then the look-up finds the attachment; nothing is sent."""
    ctx = FakeContext(_record(phase=Phase.ATTACH, mutation_sent=SENT_AT - 5))
    ctx.cloud.volumes["v1"] = {"id": "v1", "jobid": "j0"}
    ctx.cloud.waits = [{"jobstatus": 1}]
    look_up = LookUp(DONE)

    assert await _attach(ctx, look_up) == DONE

    assert ctx.cloud.log == [("volume", "v1"), ("wait", "j0")]
    assert look_up.calls == 1
    assert ctx.record.results[Phase.ATTACH] == DONE


async def test_a_lost_answer_is_looked_up_and_found_not_sent_again() -> None:
    """The send failed in a way that may have reached CloudStack (transient, maybe applied):
    the retry looks first, finds it done, and does not send a second attach."""
    ctx = FakeContext(_record())
    ctx.cloud.starts = [
        CloudStackError("cloudstack_unavailable", "timed out", transient=True, maybe_applied=True)
    ]
    look_up = LookUp(DONE)

    assert await _attach(ctx, look_up) == DONE

    assert [c[0] for c in ctx.cloud.log] == ["start", "volume"]
    assert look_up.calls == 1


async def test_a_transient_error_is_retried_and_sent_once_it_is_known_not_applied() -> None:
    ctx = FakeContext(_record())
    ctx.cloud.starts = [
        CloudStackError("cloudstack_unavailable", "503", transient=True),
        Job("j2"),
    ]
    ctx.cloud.waits = [CloudStackError("cloudstack_unavailable", "503", transient=True), DONE]
    look_up = LookUp(None)

    assert await _attach(ctx, look_up) == DONE

    # Second send only after the look-up said the first did not take effect; a transient
    # failure while polling the job polls the same job again, never sends anew.
    assert [c[0] for c in ctx.cloud.log] == ["start", "volume", "start", "wait", "wait"]
    assert look_up.calls == 1
    assert ctx.cloud.log[-2:] == [("wait", "j2"), ("wait", "j2")]


async def test_a_permanent_error_is_not_retried() -> None:
    ctx = FakeContext(_record())
    ctx.cloud.starts = [CloudStackError("cloudstack_error", "bad request")]
    with pytest.raises(CloudStackError) as raised:
        await _attach(ctx, LookUp(None))
    assert raised.value.code == "cloudstack_error"
    assert [c[0] for c in ctx.cloud.log] == ["start"]


async def test_a_failed_job_is_looked_up_then_fails_with_the_attempt_over() -> None:
    ctx = FakeContext(_record())
    ctx.cloud.starts = [Job("j3")]
    ctx.cloud.waits = [CloudStackError("cloudstack_error", "job failed", job_failed=True)]
    look_up = LookUp(None)

    with pytest.raises(CloudStackError) as raised:
        await _attach(ctx, look_up)

    assert raised.value.job_failed
    assert look_up.calls == 1  # another send might have taken effect: looked first
    assert [c[0] for c in ctx.cloud.log] == ["start", "wait", "volume"]
    last = ctx.saves[-1]  # saved: a restart does not look up an attempt known to be over
    assert last.mutation_sent is None and last.job_id is None


async def test_a_failed_job_whose_change_is_found_anyway_succeeds() -> None:
    """The job failed as a repeat of a send that did take effect: the look-up finds it."""
    ctx = FakeContext(_record())
    ctx.cloud.starts = [Job("j4")]
    ctx.cloud.waits = [CloudStackError("cloudstack_error", "already attached", job_failed=True)]
    assert await _attach(ctx, LookUp(DONE)) == DONE
    assert ctx.record.results[Phase.ATTACH] == DONE


# -- VolumeOrder ----------------------------------------------------------------------------


class FakeStream:
    """The command stream (seq → "volume|operation") with the executor consumer's ack floor,
    the ops bucket's records and the last event of each operation: what VolumeOrder reads."""

    def __init__(self, commands: dict[int, str]) -> None:
        self.commands = commands
        self.floor = 0
        self.records: dict[str, OpRecord] = {}
        self.last_status: dict[str, str] = {}
        self.reads: list[int] = []

    # Bus
    async def stored(self, stream: str, seq: int) -> StoredMessage | None:
        assert stream == EXECUTOR.stream
        self.reads.append(seq)
        body = self.commands.get(seq)
        if body is None:
            return None
        return StoredMessage(subject="volumed.cmd", data=body.encode(), headers={}, stream_seq=seq)

    async def consumer_progress(self, spec: Any) -> ConsumerProgress:
        return ConsumerProgress(ack_floor=self.floor, idle=False)

    async def last_stored(self, stream: str, subject: str) -> StoredMessage | None:
        assert stream == EVENTS.name
        for op_id, status in self.last_status.items():
            if subject == event_subject(op_id):
                data = msgspec.json.encode({"status": status})
                return StoredMessage(subject=subject, data=data, headers={}, stream_seq=0)
        return None

    # ops bucket
    async def get(self, key: str) -> tuple[OpRecord, int] | None:
        record = self.records.get(key)
        return None if record is None else (record, 1)

    def claim(self, op_id: str, seq: int, volume_id: str) -> None:
        self.records[op_id] = OpRecord(
            operation_id=op_id,
            type="attach",
            status="executing",
            stream_seq=seq,
            volume_id=volume_id,
        )

    def end(self, op_id: str) -> None:
        self.records[op_id].status = "completed"
        self.last_status[op_id] = "completed"


def _identify(stored: StoredMessage) -> Identity:
    volume_id, op_id = stored.data.decode().split("|")
    return Identity(volume_id, op_id, stored.data.decode())


def _order(stream: FakeStream) -> VolumeOrder:
    return VolumeOrder(cast(Bus, stream), cast(Bucket[OpRecord], stream), EXECUTOR, _identify)


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every look reads the fake's floor anew and polls often: no test waits on a timer."""
    monkeypatch.setattr(order_module, "_FLOOR_MAX_AGE", -1.0)
    monkeypatch.setattr(order_module, "_POLL", 0.001)


async def _still_waiting(task: asyncio.Task[None]) -> bool:
    for _ in range(20):  # many turns of the loop, and several polls of the fake
        await asyncio.sleep(0.001)
    return not task.done()


async def test_a_command_waits_for_earlier_commands_on_its_volume_only() -> None:
    stream = FakeStream({1: "v1|a", 2: "v2|b", 3: "v1|c", 4: "v2|d"})
    stream.claim("a", 1, "v1")
    stream.claim("b", 2, "v2")
    order = _order(stream)

    c = asyncio.create_task(order.turn("v1", 3, "c"))
    d = asyncio.create_task(order.turn("v2", 4, "d"))
    assert await _still_waiting(c) and await _still_waiting(d)

    stream.end("a")  # v1's earlier operation ends: c goes on, d still waits for b
    await asyncio.wait_for(c, 1.0)
    assert await _still_waiting(d)

    stream.end("b")
    await asyncio.wait_for(d, 1.0)
    order.close()


async def test_an_operation_is_done_only_once_its_terminal_event_is_out() -> None:
    stream = FakeStream({1: "v1|a", 2: "v1|c"})
    stream.claim("a", 1, "v1")
    order = _order(stream)
    c = asyncio.create_task(order.turn("v1", 2, "c"))
    stream.records["a"].status = "completed"  # saved, its terminal event not yet published
    assert await _still_waiting(c)
    stream.last_status["a"] = "completed"
    await asyncio.wait_for(c, 1.0)
    order.close()


async def test_a_command_below_the_ack_floor_is_not_waited_for() -> None:
    stream = FakeStream({1: "v1|a", 2: "v1|b", 3: "v1|c"})
    stream.floor = 2  # a and b are acknowledged: terminal, whatever the records say
    order = _order(stream)
    await asyncio.wait_for(order.turn("v1", 3, "c"), 1.0)
    assert stream.reads == []  # nothing after the floor and before 3 to read


async def test_a_copy_is_placed_at_its_first_occurrence() -> None:
    """A re-sent or conflicting copy is no operation of its own: ``first`` names the original;
    a waiter on the copy's volume does not wait for it, nor twice for the original."""
    stream = FakeStream({1: "v1|a", 2: "v2|a", 3: "v2|c", 4: "v1|a", 5: "v1|d"})
    stream.claim("a", 1, "v1")
    order = _order(stream)

    assert await order.first(2, "a") == (1, Identity("v1", "a", "v1|a"))
    assert await order.first(4, "a") == (1, Identity("v1", "a", "v1|a"))
    assert await order.first(1, "a") is None  # the original itself
    assert await order.first(3, "c") is None

    # c (v2) does not wait for a: a's place is seq 1, on v1; its copy on v2 is not an operation.
    await asyncio.wait_for(order.turn("v2", 3, "c"), 1.0)
    # d (v1) waits for a, once.
    d = asyncio.create_task(order.turn("v1", 5, "d"))
    assert await _still_waiting(d)
    order.ended_here("a")  # ended in this process: waiters go on at once
    await asyncio.wait_for(d, 1.0)

    stream.floor = 1  # the original acknowledged: a later copy is judged by its claim
    assert await order.first(4, "a") is None
    order.close()


async def test_memory_is_pruned_when_the_ack_floor_moves() -> None:
    stream = FakeStream({seq: f"v{seq}|op{seq}" for seq in range(1, 11)})
    order = _order(stream)
    order.note(10, Identity("v10", "op10", "v10|op10"))  # read anyway: not read again

    await asyncio.wait_for(order.turn("v99", 11, "x"), 1.0)
    assert order.known == 10
    assert sorted(stream.reads) == list(range(1, 10))  # each command read once

    await asyncio.wait_for(order.turn("v98", 11, "y"), 1.0)
    assert len(stream.reads) == 9  # known: not read again

    stream.floor = 7
    await asyncio.wait_for(order.turn("v97", 11, "z"), 1.0)
    assert order.known == 3  # 8, 9, 10: what the floor has not passed
    assert await order.first(11, "op2") is None  # forgotten with its command
    assert len(stream.reads) == 9
