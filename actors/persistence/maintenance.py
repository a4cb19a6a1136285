"""Operators' repairs of the database from the log: re-applying dead letters after a fix,
and rebuilding both tables from the streams into an empty database.

Both go through what the persistence actor runs (decode_event and Store.apply for events,
the proof checks and Store.apply_proof for proofs), so the same validation and the same
ordering rules apply; they only read the streams, in stream order, and never publish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from actors.persistence.backends import open_backend
from actors.persistence.proofs import unwritable
from actors.persistence.records import Event, InvalidEvent, decode_event
from actors.persistence.schema import TABLES
from actors.persistence.store import SqlStore, Store
from bus import Bus
from bus.topology import DEAD_LETTER_PREFIX, DEAD_LETTERS, EVENTS, MAPPING_PROOFS
from schemas.devices import MappingProof

log = logging.getLogger("volumed.persistence.maintenance")

_proof_decoder = msgspec.json.Decoder(MappingProof)
BATCH = 500  # events per transaction in a rebuild, as the persistence batcher's largest
# The streams whose dead letters persistence made, and ``replay`` applies.
REPLAYABLE = (EVENTS.name, MAPPING_PROOFS.name)


class NotEmpty(Exception):
    """The rebuild's target already holds rows: it would mix two histories."""


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    """Its sequence in VOLUMED_DEAD_LETTERS."""
    stream: str
    consumer: str
    subject: str
    """The subject it was published on (volume.events.<operation_id>, ...)."""
    stream_seq: int
    """Its sequence in its own stream."""
    deliveries: int
    reason: str
    data: bytes


async def dead_letters(bus: Bus, *, subject: str = "") -> list[DeadLetter]:
    """The dead letters, oldest first; ``subject``: only those first published on it (NATS
    wildcards allowed, e.g. ``volume.events.>``)."""
    out = []
    async for msg in bus.messages(DEAD_LETTERS.name, subject=f"{DEAD_LETTER_PREFIX}.>"):
        h = msg.headers
        # volumed.dead.<stream>.<consumer>
        stream, consumer = [*msg.subject.split(".", 3)[2:], "", ""][:2]
        original = h.get("Volumed-Subject", "")
        if subject and not subject_matches(subject, original):
            continue
        out.append(
            DeadLetter(
                seq=msg.stream_seq,
                stream=stream,
                consumer=consumer,
                subject=original,
                stream_seq=int(h.get("Volumed-Stream-Seq") or 0),
                deliveries=int(h.get("Volumed-Deliveries") or 0),
                reason=h.get("Volumed-Reason", ""),
                data=msg.data,
            )
        )
    return out


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


async def replay(
    bus: Bus, store: Store, letters: list[DeadLetter], *, keep: bool = False
) -> list[tuple[DeadLetter, str]]:
    """Apply each dead-lettered event or mapping proof to ``store``, in order; remove the
    letters applied (unless ``keep``). Returns each letter with what became of it ("applied",
    or why not). A database error stops the replay (raised): the rest stay for later."""
    out = []
    for letter in letters:
        outcome = await _replay_one(store, letter)
        if outcome == "applied" and not keep:
            await bus.delete_stored(DEAD_LETTERS.name, letter.seq)
        out.append((letter, outcome))
    return out


async def _replay_one(store: Store, letter: DeadLetter) -> str:
    if letter.stream == EVENTS.name:
        try:
            event = decode_event(letter.subject, letter.data)
        except InvalidEvent as e:
            return f"still not writable: {e}"
        await store.apply([event])
        return "applied"
    if letter.stream == MAPPING_PROOFS.name:
        try:
            proof = _proof_decoder.decode(letter.data)
        except msgspec.DecodeError as e:
            return f"still not decodable: {e}"
        problem = unwritable(proof)
        if problem:
            return f"still not writable: {problem}"
        # Its place in the proofs stream, as when it was first delivered.
        await store.apply_proof(proof, letter.stream_seq)
        return "applied"
    return (
        f"not replayable here: a message of {letter.stream} (a command is sent again with a "
        "new operation id)"
    )


@dataclass
class Rebuilt:
    events: int = 0
    proofs: int = 0
    skipped: int = 0
    """Messages that decoding refuses (each is, or was, a dead letter)."""
    first_event: int = 1
    """The events stream's oldest sequence: above 1, older events had aged out."""


async def rebuild(bus: Bus, dsn: str, *, progress: Callable[[str], None] | None = None) -> Rebuilt:
    """Fill the empty database at ``dsn`` (tables made if missing) from the events stream,
    from its first message, then from each VM's latest mapping proof. Raises NotEmpty when
    either table has a row."""
    backend = await open_backend(dsn)
    store = SqlStore(backend)
    try:
        async with backend.connection() as conn:
            for table in TABLES:
                rows = await conn.fetch(f"SELECT COUNT(*) AS n FROM {table.name}")
                if int(rows[0]["n"]):
                    raise NotEmpty(
                        f"{backend.where}: {table.name} has {rows[0]['n']} rows; "
                        "a rebuild needs empty tables"
                    )
        done = Rebuilt()
        done.first_event = await bus.first_sequence(EVENTS.name)
        if done.first_event > 1 and progress is not None:
            # Older events aged out (the stream's max age) or were removed: their operations
            # are not in the rebuilt tables, and a mapping they alone made is missing.
            progress(
                f"{EVENTS.name} starts at sequence {done.first_event}: the events before it "
                "are gone (retention), so the operations they alone describe are not rebuilt"
            )
        batch: list[Event] = []
        async for msg in bus.messages(EVENTS.name):
            try:
                batch.append(decode_event(msg.subject, msg.data))
            except InvalidEvent as e:
                done.skipped += 1
                log.warning("event at %s seq %d skipped: %s", EVENTS.name, msg.stream_seq, e)
                continue
            if len(batch) >= BATCH:
                await store.apply(batch)
                done.events += len(batch)
                batch = []
                if progress is not None:
                    progress(f"{done.events} events applied (up to {EVENTS.name} {msg.stream_seq})")
        if batch:
            await store.apply(batch)
            done.events += len(batch)
        async for msg in bus.messages(MAPPING_PROOFS.name):
            try:
                proof = _proof_decoder.decode(msg.data)
            except msgspec.DecodeError:
                done.skipped += 1
                continue
            if unwritable(proof):
                done.skipped += 1
                continue
            await store.apply_proof(proof, msg.stream_seq)
            done.proofs += 1
        return done
    finally:
        await store.close()
