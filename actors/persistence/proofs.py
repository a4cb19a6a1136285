"""Applying the correlators' mapping proofs (``volumed.proof.<vm_id>``) to device_mappings."""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable

import msgspec

from actors.persistence.gate import WriteGate
from actors.persistence.schema import MAX_PATH
from actors.persistence.store import Store
from bus import Abandon, Delivery, Reject
from schemas.devices import MappingProof

log = logging.getLogger("volumed.persistence.proofs")


class ProofHandler:
    """One proof per delivery, applied in one transaction (the store decides which rows it
    may change). A proof that cannot fit the columns is dead-lettered before it reaches
    the database; anything the database refuses waits for redelivery."""

    def __init__(self, store: Callable[[], Store | None], gate: WriteGate) -> None:
        self._store = store
        self._gate = gate
        self._decoder = msgspec.json.Decoder(MappingProof)
        self.applied = 0

    async def handle(self, delivery: Delivery) -> None:
        try:
            proof = self._decoder.decode(delivery.data)
        except msgspec.DecodeError as e:
            raise Reject(f"undecodable mapping proof: {e}") from None
        problem = unwritable(proof)
        if problem:
            raise Reject(f"the mapping proof cannot be stored: {problem}")
        store = self._store()
        if store is None:
            raise Abandon("the database is not open yet")
        # Whatever the database answers is its own state, never the proof's (errors.py):
        # the gate keeps the proof waiting in the stream while the database refuses. Ordered
        # by the stream, never by the correlator's clock (``proof.at``).
        changed = await self._gate.write(lambda: store.apply_proof(proof, delivery.stream_seq))
        self.applied += 1
        log.debug("mapping proof of VM %s: %d mappings updated", proof.vm_id, changed)


# proof_reason is a TEXT column: at most this many bytes on MariaDB.
MAX_REASON_BYTES = 65_535


def unwritable(proof: MappingProof) -> str:
    """Why the columns cannot hold what ``proof`` writes ("" when they can): checked before
    the database, so that whatever the database refuses is its own state (errors.py)."""
    try:
        year = dt.datetime.fromtimestamp(proof.at, dt.UTC).year if math.isfinite(proof.at) else 0
    except (OverflowError, OSError, ValueError):
        year = 0
    if not 1000 <= year <= 9999:
        return f"at: {proof.at} is not a time between the years 1000 and 9999"
    for m in proof.mappings:
        for name in ("device_path", "by_id_path"):
            value = getattr(m, name)
            if value is not None and len(value) > MAX_PATH:
                return f"{name} of volume {m.volume_id[:64]}: longer than {MAX_PATH} characters"
        if len(m.reason.encode()) > MAX_REASON_BYTES:
            return f"reason of volume {m.volume_id[:64]}: longer than {MAX_REASON_BYTES} bytes"
    return ""
