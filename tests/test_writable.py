"""What passes decoding can be written: the one ground for a dead letter is an event (or a
mapping proof) that decoding and validation refuse, so anything they let through must fit
the columns of both databases. Any database error is then the database's own state, and
persistence waits for it instead of dropping the event (actors/persistence/errors.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import aiomysql
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.persistence import Store, open_store
from actors.persistence.proofs import unwritable
from actors.persistence.records import InvalidEvent, decode_event
from actors.persistence.schema import MAX_ID, MAX_PATH, MAX_REF
from bus.topology import event_subject
from schemas.devices import MappingProof, ProvenMapping
from tests.conftest import MARIADB_HOST, MARIADB_PORT

OP_IDS = st.one_of(st.sampled_from(["op-1", "op-2", "A_b-9"]), st.text(max_size=66))


def sized(limit: int) -> st.SearchStrategy[str | None]:
    """None, short text, or text at the column's limit and just past it (any code point,
    emoji and NUL included: the columns count characters, not bytes)."""
    return st.one_of(
        st.none(),
        st.text(max_size=4),
        st.sampled_from([limit - 1, limit, limit + 1]).flatmap(
            lambda n: st.text(min_size=n, max_size=n)
        ),
    )


def nested(depth: int) -> Any:
    value: Any = "deep"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
TIMES = st.one_of(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2),
        max_value=dt.datetime(9999, 12, 30),
        timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=14))]),
    ).map(lambda t: t.isoformat()),
    st.text(max_size=30),
)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "operation_id": draw(OP_IDS),
        "type": draw(st.sampled_from(["create", "attach", "detach", "delete", "cancel"])),
        "status": draw(st.sampled_from(["pending", "executing", "completed", "failed"])),
        "at": draw(TIMES),
        "volume_id": draw(sized(MAX_REF)),
        "vm_id": draw(sized(MAX_REF)),
        "device_path": draw(sized(MAX_PATH)),
        "by_id_path": draw(sized(MAX_PATH)),
        "target": draw(sized(MAX_ID)),
        "request": draw(st.one_of(JSON, st.integers(25, 40).map(nested))),
        "response": draw(JSON),
        "size": draw(st.one_of(st.none(), st.sampled_from([-1, 0, 2**63 - 1, 2**63]))),
        "attached": draw(st.one_of(st.none(), st.booleans())),
    }
    if draw(st.booleans()):
        body["error"] = {"code": "internal", "message": draw(st.text())}
    return body


PROOF_AT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-30_610_224_001.0, 253_402_300_799.0, 1.9e9]),
)


def test_whatever_decodes_can_be_written_on_both_databases(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    name = f"volumed_test_{uuid.uuid4().hex[:12]}"

    async def open_both() -> list[Store]:
        return [
            await open_store(f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"),
            await open_store(f"sqlite://{tmp_path}/w.db"),
        ]

    stores = loop.run_until_complete(open_both())

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies(), proof=st.tuples(sized(MAX_PATH), st.text(), PROOF_AT))
    # Past MariaDB's limits that the lengths alone did not catch: JSON nested 32 deep, a
    # year before 1000 (or shifted there by its zone), a proof time past 9999.
    @example(
        body={"operation_id": "d", "type": "create", "status": "pending", "at": "2030-01-01"}
        | {"request": nested(32)},
        proof=(None, "", 1.9e9),
    )
    @example(
        body={"operation_id": "y", "type": "create", "status": "pending"}
        | {"at": "1000-01-01T00:30:00+01:00"},
        proof=(None, "", 1.9e9),
    )
    @example(
        body={"operation_id": "p", "type": "attach", "status": "completed", "at": "2030-01-01"}
        | {"volume_id": "v", "vm_id": "m", "attached": True},
        proof=("/dev/vdb", "", 253_402_300_800.0),
    )
    def check(body: dict[str, Any], proof: tuple[str | None, str, float]) -> None:
        data = json.dumps(body).encode()
        try:
            event = decode_event(event_subject(str(body["operation_id"])), data)
        except InvalidEvent:
            return  # dead-lettered: this event alone can never be written
        mapping = ProvenMapping(
            volume_id=event.raw.volume_id or "v",
            operation_id=event.raw.operation_id,
            proof="serial",
            device_path=proof[0],
            reason=proof[1],
        )
        mapping_proof = MappingProof(vm_id=event.raw.vm_id or "m", at=proof[2], mappings=(mapping,))
        for store in stores:
            # Raises (failing the test) if the database refuses what validation let through.
            loop.run_until_complete(store.apply([event]))
            if not unwritable(mapping_proof):
                loop.run_until_complete(store.apply_proof(mapping_proof, 1))

    try:
        check()
    finally:
        for store in stores:
            loop.run_until_complete(store.close())
        loop.run_until_complete(_drop(name))
        loop.close()


async def _drop(name: str) -> None:
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()
