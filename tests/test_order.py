"""Persistence orders by the log (issue 13): a volume's mapping follows its operations'
command sequence, a proof the proofs stream's sequence, never a clock; device paths are
unique per VM. Against the real store on SQLite and MariaDB.

The processes test (an executor whose clock runs 40 s ahead) is in test_order_clocks.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomysql
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.persistence import Store, open_store
from actors.persistence.errors import StoreUnavailable
from actors.persistence.records import Event, parse_time
from actors.persistence.schema import DEVICE_MAPPINGS, MYSQL, SQLITE, VOLUME_OPERATIONS, Index
from schemas.common import GIB
from schemas.devices import MappingProof, ProvenMapping
from schemas.events import OperationEvent
from tests.conftest import MARIADB_HOST, MARIADB_PORT, Database

BASE = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
VM = "vm-1"

# What the executor can report at the end of an attach, detach or delete: (type, status,
# attached). A failed attach may have rolled back (False) or not (True: the roll-back
# failed); a failed delete may have detached first (False); None: it changed nothing (only
# an attach ever says True: operations.attachment_after).
OUTCOMES = (
    ("attach", "completed", True),
    ("attach", "failed", None),
    ("attach", "failed", False),
    ("attach", "failed", True),
    ("detach", "completed", False),
    ("detach", "failed", None),
    ("delete", "completed", False),
    ("delete", "failed", None),
    ("delete", "failed", False),
)


@dataclasses.dataclass(frozen=True)
class Op:
    id: str
    seq: int  # the command's stream sequence
    type: str
    status: str
    attached: bool | None
    device_path: str
    clock: float  # seconds off the true time of the executor that ran it

    def events(self, volume_id: str, legacy: bool = False, vm_id: str = VM) -> list[Event]:
        """pending, executing and the terminal event, stamped by the op's executor clock;
        ``legacy``: without seq, as an executor before issue 13 sent them."""
        out = []
        for step, status in enumerate(("pending", "executing", self.status)):
            attach = self.type == "attach"
            terminal = step == 2
            raw = OperationEvent(
                operation_id=self.id,
                type=self.type,  # type: ignore[arg-type]
                status=status,  # type: ignore[arg-type]
                volume_id=volume_id,
                vm_id=vm_id if attach else None,
                device_path=self.device_path if attach and terminal else None,
                size=GIB if attach and terminal else None,
                attached=self.attached if terminal else None,
                at=_at(self.seq * 10 + step + self.clock),
                seq=None if legacy else self.seq,
            )
            out.append(Event(raw=raw, at=parse_time(raw.at)))
        return out


def _at(seconds: float) -> str:
    return (BASE + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expected_mapping(ops: Sequence[Op]) -> tuple[str, str] | None:
    """What command order gives: the last operation that says whether it is attached."""
    last = None
    for op in sorted(ops, key=lambda o: o.seq):
        if op.attached is not None:
            last = op
    if last is None or not last.attached:
        return None
    return last.id, last.device_path


async def state(store: Store, volume_id: str, ops: Sequence[Op]) -> tuple[Any, ...]:
    m = await store.mapping_by_volume(volume_id)
    mapping = None if m is None else (m.operation_id, m.device_path)
    statuses = []
    for op in ops:
        row = await store.operation(op.id)
        statuses.append(None if row is None else row.status)
    return mapping, tuple(statuses)


async def apply_until_done(store: Store, events: Sequence[Event]) -> None:
    """One batch, tried again while the database says "later" (a deadlock between the two
    writers): as the consumer's redelivery would."""
    for _ in range(20):
        try:
            await store.apply(events)
            return
        except StoreUnavailable:
            await asyncio.sleep(0.01)
    await store.apply(events)


@pytest.fixture(params=["mysql", "sqlite"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/order.db"
    db: Database = request.getfixturevalue("database")
    return db.dsn


# -- the property ------------------------------------------------------------------------

HISTORY = st.lists(
    st.tuples(
        st.sampled_from(OUTCOMES),
        st.sampled_from(["/dev/vdb", "/dev/vdc"]),
        # Executors' clocks: off by up to two hours either way (and so stepping back).
        st.integers(-7200, 7200),
    ),
    min_size=1,
    max_size=5,
)


def run_property(dsn: str, *, legacy: bool = False) -> None:
    """In a thread of its own (its own event loop): hypothesis calls the test once per
    example, and the two stores stay open across examples."""
    loop = asyncio.new_event_loop()
    stores = [loop.run_until_complete(open_store(dsn)) for _ in range(2)]
    counter = itertools.count()

    @settings(
        max_examples=30,
        derandomize=True,  # the suite's outcome never depends on the draw
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(history=HISTORY, data=st.data())
    def prop(history: list[tuple[tuple[str, str, bool | None], str, int]], data: Any) -> None:
        n = next(counter)
        ops = [
            Op(f"p{n}-{i}", 10 * n + i + 1, t, s, a, path, clock)
            for i, ((t, s, a), path, clock) in enumerate(history)
        ]
        reference, volume = f"ref-{n}", f"vol-{n}"
        ref_ops = [dataclasses.replace(op, id=f"r{op.id}") for op in ops]
        # In command order, one event at a time, one writer.
        for op in ref_ops:
            for event in op.events(reference, legacy, f"vm-{reference}"):
                loop.run_until_complete(stores[0].apply([event]))
        events = [e for op in ops for e in op.events(volume, legacy, f"vm-{volume}")]
        # The same history on a second volume, its events mixed into the same batches: a
        # batch of both volumes takes their heads first (_lock_heads), one of a single volume
        # moves its head with one statement (_move_head); either may follow the other.
        other, other_ops = f"other-{n}", [dataclasses.replace(op, id=f"q{op.id}") for op in ops]
        events += [e for op in other_ops for e in op.events(other, legacy, f"vm-{other}")]
        redelivered = data.draw(st.lists(st.sampled_from(events), max_size=4), "redelivered")
        arrival = data.draw(st.permutations(events + redelivered), "arrival")
        cuts = sorted(data.draw(st.sets(st.integers(1, len(arrival) - 1)), "batches"))
        batches = [arrival[a:b] for a, b in itertools.pairwise([0, *cuts, len(arrival)])]
        writers = data.draw(st.lists(st.sampled_from([0, 1]), min_size=len(batches)), "writer")

        async def writer(w: int) -> None:
            for batch, who in zip(batches, writers, strict=False):
                if who == w:
                    await apply_until_done(stores[w], batch)

        async def both() -> None:
            await asyncio.gather(writer(0), writer(1))

        loop.run_until_complete(both())
        want = loop.run_until_complete(state(stores[0], reference, ref_ops))
        want_mapping = expected_mapping(ref_ops)
        assert want[0] == want_mapping, "the reference itself is wrong"
        for prefix, name, its_ops in (("", volume, ops), ("q", other, other_ops)):
            got = loop.run_until_complete(state(stores[1], name, its_ops))
            renamed = (
                None if want[0] is None else (prefix + want[0][0][1:], *want[0][1:]),
                want[1],
            )
            assert got == renamed, f"{name}: {history=} {arrival=}"

    try:
        prop()
    finally:
        for store in stores:
            loop.run_until_complete(store.close())
        loop.close()


async def test_any_arrival_order_gives_the_rows_of_the_command_order(dsn: str) -> None:
    """Any arrival order of a volume's events, with redeliveries, in batches split between
    two writers (two persistence processes), whatever the executors' clocks say: the rows
    are those of applying the events in command order."""
    await asyncio.to_thread(run_property, dsn)


# -- late events ---------------------------------------------------------------------------


def op(n: int, type_: str, status: str, attached: bool | None, *, clock: float = 0.0) -> Op:
    return Op(f"op-{n}", n, type_, status, attached, "/dev/vdb", clock)


def terminal(o: Op, volume_id: str = "v1") -> Event:
    return o.events(volume_id)[2]


async def test_a_late_attach_after_a_delete_that_detached_then_failed_makes_no_row(
    dsn: str,
) -> None:
    store = await open_store(dsn)
    try:
        attach = op(1, "attach", "completed", True)
        delete = op(2, "delete", "failed", False)
        await store.apply(attach.events("v1")[:2])
        await store.apply([terminal(delete)])
        # The attach's terminal event, redelivered (a persistence process killed with it in
        # hand), arrives after the delete's: the volume is not attached, no row.
        await store.apply([terminal(attach)])
        assert await store.mapping_by_volume("v1") is None
        assert (await store.operation("op-1"), await store.operation("op-2")) != (None, None)
    finally:
        await store.close()


async def test_a_late_detach_keeps_a_newer_attachs_row_whatever_the_clocks(dsn: str) -> None:
    store = await open_store(dsn)
    try:
        # The second attach ran on an executor whose clock is an hour behind.
        first = op(1, "attach", "completed", True)
        detach = op(2, "detach", "completed", False)
        second = op(3, "attach", "completed", True, clock=-3600)
        await store.apply([terminal(second)])
        await store.apply([terminal(detach)])
        await store.apply([terminal(first)])
        m = await store.mapping_by_volume("v1")
        assert m is not None and (m.operation_id, m.device_path) == ("op-3", "/dev/vdb")
    finally:
        await store.close()


async def test_two_writers_at_once_serialise_a_volume(database: Database) -> None:
    """MariaDB: two persistence processes apply a volume's detach and its late attach at the
    same moment; whichever commits first, no row is left (the volume head is locked)."""
    stores = [await open_store(database.dsn) for _ in range(2)]
    try:
        volumes = [f"v{i}" for i in range(60)]
        first = op(1, "attach", "completed", True)
        await asyncio.gather(
            *(
                apply_until_done(stores[i % 2], [terminal(replace(first, id=f"f-{v}"), v)])
                for i, v in enumerate(volumes)
            )
        )
        attach = op(2, "attach", "completed", True)
        detach = op(3, "detach", "completed", False)
        attach_events = [terminal(replace(attach, id=f"a-{v}"), v) for v in volumes]
        detach_events = [terminal(replace(detach, id=f"d-{v}"), v) for v in volumes]
        await asyncio.gather(
            *(apply_until_done(stores[0], [e]) for e in detach_events),
            *(apply_until_done(stores[1], [e]) for e in attach_events),
        )
        left = [v for v in volumes if await stores[0].mapping_by_volume(v) is not None]
        assert left == []
    finally:
        for store in stores:
            await store.close()


# -- two hosts, one database ------------------------------------------------------------


def attach_to(vm_id: str, volume_id: str, n: int, path: str = "/dev/vdb") -> Event:
    raw = OperationEvent(
        operation_id=f"a-{n}",
        type="attach",
        status="completed",
        volume_id=volume_id,
        vm_id=vm_id,
        device_path=path,
        attached=True,
        size=GIB,
        at=_at(n),
        seq=n,
    )
    return Event(raw=raw, at=parse_time(raw.at))


async def test_two_hosts_each_keep_their_own_vdb(dsn: str) -> None:
    store = await open_store(dsn)
    try:
        await store.apply([attach_to("vm-a", "va", 1)])
        await store.apply([attach_to("vm-b", "vb", 2)])
        rows = {
            m.volume_id: m
            for m in [*await store.vm_volumes("vm-a"), *await store.vm_volumes("vm-b")]
        }
        assert {v: (m.vm_id, m.device_path) for v, m in rows.items()} == {
            "va": ("vm-a", "/dev/vdb"),
            "vb": ("vm-b", "/dev/vdb"),
        }
        # A proof of vm-b's vdb is not refused because vm-a's row names a /dev/vdb too.
        proof = MappingProof(
            vm_id="vm-b",
            at=0.0,
            mappings=(
                ProvenMapping(
                    volume_id="vb", operation_id="a-2", proof="serial", device_path="/dev/vdb"
                ),
            ),
        )
        assert await store.apply_proof(proof, 1) == 1
        vb = await store.mapping_by_volume("vb")
        assert vb is not None and (vb.device_path, vb.proof) == ("/dev/vdb", "serial")
        # Within one VM a device names one volume: the newer attach takes it.
        await store.apply([attach_to("vm-a", "va2", 3)])
        assert [m.volume_id for m in await store.vm_volumes("vm-a")] == ["va2"]
        assert [m.volume_id for m in await store.vm_volumes("vm-b")] == ["vb"]
    finally:
        await store.close()


async def test_proofs_are_ordered_by_their_stream_sequence_not_their_clock(dsn: str) -> None:
    store = await open_store(dsn)
    try:
        await store.apply([attach_to(VM, "v1", 1)])

        def proof(path: str | None, at: float) -> MappingProof:
            m = ProvenMapping(
                volume_id="v1",
                operation_id="a-1",
                proof="serial" if path else "none",
                device_path=path,
                reason="" if path else "gone",
            )
            return MappingProof(vm_id=VM, at=at, mappings=(m,))

        # The newer proof (stream sequence 8) comes from a correlator whose clock is behind.
        assert await store.apply_proof(proof("/dev/vdc", 1000.0), 8) == 1
        assert await store.apply_proof(proof(None, 2000.0), 7) == 0
        m = await store.mapping_by_volume("v1")
        assert m is not None and m.device_path == "/dev/vdc"
    finally:
        await store.close()


# -- upgrade -------------------------------------------------------------------------------


async def test_a_database_of_the_previous_version_is_upgraded_in_place(dsn: str) -> None:
    """The tables as the previous version made them: device_path unique across all VMs, no
    seq columns, no volume_heads. Opening the store upgrades them and keeps the rows."""
    old_ops = dataclasses.replace(
        VOLUME_OPERATIONS, columns=tuple(c for c in VOLUME_OPERATIONS.columns if c.name != "seq")
    )
    old_maps = dataclasses.replace(
        DEVICE_MAPPINGS,
        columns=tuple(c for c in DEVICE_MAPPINGS.columns if c.name not in ("seq", "proof_seq")),
        indexes=(
            Index("uq_device_mappings_volume_id", ("volume_id",), unique=True),
            Index("uq_device_mappings_device_path", ("device_path",), unique=True),
            Index("idx_device_mappings_vm_id", ("vm_id",)),
        ),
    )
    insert = (
        "INSERT INTO device_mappings (volume_id, vm_id, device_path, last_sync, operation_id, "
        "attached_at) VALUES ('old', 'vm-a', '/dev/vdb', '2030-01-01 00:00:00', 'a-0', "
        "'2030-01-01 00:00:00')"
    )
    if dsn.startswith("sqlite://"):
        path = dsn.removeprefix("sqlite://")
        db = sqlite3.connect(path)
        for statement in [*SQLITE.table_ddl(old_ops), *SQLITE.table_ddl(old_maps), insert]:
            db.execute(statement)
        db.commit()
        db.close()
    else:
        name = dsn.rsplit("/", 1)[1]
        conn = await aiomysql.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
        )
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"CREATE DATABASE `{name}` COLLATE utf8mb4_bin")
                await cur.execute(f"USE `{name}`")
                for statement in [*MYSQL.table_ddl(old_ops), *MYSQL.table_ddl(old_maps), insert]:
                    await cur.execute(statement)
        finally:
            conn.close()
    for _ in range(2):  # and a second start finds nothing left to do
        store = await open_store(dsn)
        try:
            old = await store.mapping_by_volume("old")
            assert old is not None and old.device_path == "/dev/vdb"
            await store.apply([attach_to("vm-b", "new", 1)])
            new = await store.mapping_by_volume("new")
            assert new is not None and (new.vm_id, new.device_path) == ("vm-b", "/dev/vdb")
            assert (await store.operation("a-1")) is not None
        finally:
            await store.close()


async def test_events_without_seq_follow_the_previous_rule_and_come_before_any_with_seq(
    dsn: str,
) -> None:
    """An older executor's events (no seq, still in the stream after an upgrade): ordered
    among themselves by completion time, as before, and older than every event with seq."""
    store = await open_store(dsn)
    try:

        def legacy(o: Op) -> Event:
            return o.events("v1", legacy=True)[2]

        await store.apply([legacy(op(1, "attach", "completed", True))])
        await store.apply([legacy(op(2, "detach", "completed", False))])
        assert await store.mapping_by_volume("v1") is None
        # Completed before the detach by its clock: the previous version's rule keeps it out.
        await store.apply([legacy(op(3, "attach", "completed", True, clock=-100))])
        assert await store.mapping_by_volume("v1") is None
        await store.apply([terminal(op(4, "attach", "completed", True))])
        # Later by its clock, but without seq: older than the attach that has one.
        await store.apply([legacy(op(5, "detach", "completed", False, clock=1000))])
        m = await store.mapping_by_volume("v1")
        assert m is not None and m.operation_id == "op-4"
    finally:
        await store.close()


async def test_a_late_attach_never_takes_the_device_of_a_volume_attached_after_it(
    dsn: str,
) -> None:
    """In one VM, volume A is attached at vdb and detached, then B is attached at vdb. A's
    attach event arrives late (after B's, before A's detach): B keeps its row and vdb."""
    store = await open_store(dsn)
    try:
        a_attach = op(1, "attach", "completed", True)
        a_detach = op(2, "detach", "completed", False)
        b_attach = op(3, "attach", "completed", True)
        await store.apply([terminal(b_attach, "b")])
        await store.apply([terminal(a_attach, "a")])
        a = await store.mapping_by_volume("a")
        assert a is not None and (a.device_path, a.proof) == (None, "none")
        await store.apply([terminal(a_detach, "a")])
        assert [(m.volume_id, m.device_path) for m in await store.vm_volumes(VM)] == [
            ("b", "/dev/vdb")
        ]
        # A later command's attach at vdb (B's detach not recorded yet) takes the name.
        c_attach = op(4, "attach", "completed", True)
        await store.apply([terminal(c_attach, "c")])
        assert [(m.volume_id, m.device_path) for m in await store.vm_volumes(VM)] == [
            ("c", "/dev/vdb")
        ]
    finally:
        await store.close()
