"""Unit tests of the look-up of a create whose createVolume answer was lost
(actors/executor/operations.py ``_find_created``), against fakes: which volume it adopts,
and when it waits for other creates in doubt or refuses. The fakes implement exactly what it
uses: a Context (``settings``, ``record``, ``cloud.volumes_named``, ``owners``, ``creates``).

End to end, across two executor processes, against persistence, the simulator and real NATS:
tests/test_promises.py (test_creates_in_doubt_are_seen_across_executor_processes); the
query's rules against both databases: tests/test_persistence.py.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from actors.executor import operations
from actors.executor.operations import CannotTell, Context, CreateKey, OperationFailed
from schemas.commands import CreateCommand
from schemas.common import GIB, epoch_of
from schemas.config import Settings
from schemas.internal import OpRecord

NEAR = "2030-01-01T00:00:00+0000"  # as CloudStack writes `created`
SENT = cast(float, epoch_of(NEAR)) + 2.0  # when this create sent createVolume (its clock)
CMD = CreateCommand(name="twin", size=GIB, zone_id="z", disk_offering_id="o")
KEY: CreateKey = (CMD.name, CMD.size, CMD.zone_id, CMD.disk_offering_id)


def volume(volume_id: str, created: str = NEAR) -> dict[str, Any]:
    return {"id": volume_id, "size": GIB, "zoneid": "z", "diskofferingid": "o", "created": created}


class FakeCloud:
    def __init__(self, volumes: list[dict[str, Any]]) -> None:
        self.volumes = volumes

    async def volumes_named(self, name: str) -> list[dict[str, Any]]:
        return list(self.volumes)


class FakeOwners:
    def __init__(self, held: dict[str, str]) -> None:
        self.held = held
        self.claims: list[str] = []

    async def owner(self, volume_id: str) -> str | None:
        return self.held.get(volume_id)

    async def claim(self, volume_id: str, operation_id: str) -> str | None:
        self.claims.append(volume_id)
        holder = self.held.setdefault(volume_id, operation_id)
        return None if holder == operation_id else holder


class FakeCreates:
    """Persistence's answers, one per question (the last repeats); an exception is raised."""

    def __init__(self, *answers: list[str] | Exception, then: Any = None) -> None:
        self.answers = list(answers)
        self.asked = 0
        self.then = then  # called after each answer: the world moves on meanwhile

    async def in_doubt(self, key: CreateKey, operation_id: str) -> list[str]:
        assert key == KEY and operation_id == "me"
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if self.then is not None:
            self.then(self.asked)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeContext:
    def __init__(self, cloud: FakeCloud, owners: FakeOwners, creates: FakeCreates) -> None:
        self.settings = Settings(cloudstack_timeout=0.2)
        self.record = OpRecord(operation_id="me", type="create", status="executing", stream_seq=1)
        self.cloud = cloud
        self.owners = owners
        self.creates = creates


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations, "CREATES_POLL", 0.01)


async def find(ctx: FakeContext) -> dict[str, Any] | None:
    return await operations._find_created(cast(Context, ctx), CMD, KEY, SENT)


async def test_the_one_unclaimed_match_is_adopted_when_no_other_create_is_in_doubt() -> None:
    owners = FakeOwners({})
    ctx = FakeContext(FakeCloud([volume("v1")]), owners, FakeCreates([]))
    assert await find(ctx) == {"volume": volume("v1")}
    assert owners.held == {"v1": "me"}


async def test_no_match_asks_nothing() -> None:
    creates = FakeCreates(CannotTell("never asked"))
    ctx = FakeContext(
        FakeCloud([volume("v1", "1970-01-01T00:00:00+0000")]), FakeOwners({}), creates
    )
    assert await find(ctx) is None  # created long before the send: not this create's
    assert creates.asked == 0


async def test_a_create_in_doubt_is_waited_for_until_it_claims_the_volume() -> None:
    owners = FakeOwners({})

    def other_claims(asked: int) -> None:
        if asked == 3:
            owners.held["v1"] = "other"

    ctx = FakeContext(FakeCloud([volume("v1")]), owners, FakeCreates(["other"], then=other_claims))
    assert await find(ctx) is None  # the volume was the other's: this create made none
    assert owners.claims == []


async def test_a_create_in_doubt_that_holds_a_volume_of_these_parameters_is_not_waited_for() -> (
    None
):
    owners = FakeOwners({"v0": "other"})
    creates = FakeCreates(["other"])
    ctx = FakeContext(FakeCloud([volume("v0"), volume("v1")]), owners, creates)
    assert await find(ctx) == {"volume": volume("v1")}
    assert creates.asked == 1 and owners.held["v1"] == "me"


async def test_a_create_still_in_doubt_after_the_wait_is_refused_and_nothing_taken() -> None:
    owners = FakeOwners({})
    ctx = FakeContext(FakeCloud([volume("v1")]), owners, FakeCreates(["other"]))
    with pytest.raises(OperationFailed) as failed:
        await find(ctx)
    assert "other" in failed.value.message and "v1" in failed.value.message
    assert failed.value.code == "cloudstack_error"
    assert owners.claims == [] and owners.held == {}


async def test_persistence_that_cannot_tell_is_waited_for_then_refused() -> None:
    owners = FakeOwners({})
    creates = FakeCreates(CannotTell("the database is behind the events stream"))
    ctx = FakeContext(FakeCloud([volume("v1")]), owners, creates)
    with pytest.raises(OperationFailed) as failed:
        await find(ctx)
    assert "the database is behind" in failed.value.message
    assert creates.asked > 1  # asked again while it waited
    assert owners.claims == [] and owners.held == {}


async def test_persistence_back_within_the_wait_lets_the_look_up_go_on() -> None:
    owners = FakeOwners({})
    creates = FakeCreates(CannotTell("persistence did not answer (TimeoutError)"), [])
    ctx = FakeContext(FakeCloud([volume("v1")]), owners, creates)
    assert await find(ctx) == {"volume": volume("v1")}
    assert creates.asked == 2
