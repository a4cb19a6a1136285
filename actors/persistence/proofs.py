"""Applying the correlators' mapping proofs (``volumed.proof.<vm_id>``) to device_mappings."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from actors.persistence.errors import StoreRefused
from actors.persistence.store import Store
from bus import Abandon, Delivery, Reject
from schemas.devices import MappingProof

log = logging.getLogger("volumed.persistence.proofs")


class ProofHandler:
    """One proof per delivery, applied in one transaction (the store decides which rows it
    may change). A database outage leaves the proof for redelivery."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self._store = store
        self._decoder = msgspec.json.Decoder(MappingProof)
        self.applied = 0

    async def handle(self, delivery: Delivery) -> None:
        try:
            proof = self._decoder.decode(delivery.data)
        except msgspec.DecodeError as e:
            raise Reject(f"undecodable mapping proof: {e}") from None
        store = self._store()
        if store is None:
            raise Abandon("the database is not open yet")
        try:
            # Ordered by the stream, never by the correlator's clock (``proof.at``).
            changed = await store.apply_proof(proof, delivery.stream_seq)
        except StoreRefused as e:
            if e.schema:
                raise  # an operator must fix the schema: redelivered meanwhile
            raise Reject(f"the database refused the mapping proof: {e}") from None
        self.applied += 1
        log.debug("mapping proof of VM %s: %d mappings updated", proof.vm_id, changed)
