"""Which hosts have shown that their devices carry serials (the serials bucket).

Until a host has, attaches to it start one at a time (the executor's gate lease), so that
its correlator can prove a serial-less device by exclusion. An attach's proof (its
``Outcome.proof``) is noted here by the run that completed it.
"""

from __future__ import annotations

import logging

from bus import Bucket
from schemas.common import now_rfc3339
from schemas.internal import SerialsShown

log = logging.getLogger("volumed.executor")


class Serials:
    def __init__(self, bucket: Bucket[SerialsShown]) -> None:
        self.bucket = bucket
        # VM id → whether its devices carry serials, as this process last read or wrote it
        # (the bucket is the truth, shared by every process on every host).
        self._known: dict[str, bool] = {}

    async def note(self, vm_id: str, proof: str, operation_id: str) -> None:
        """An attach to ``vm_id`` was proven: by its device's serial, or else (exclusion).
        Kept per host, written only when it changes; a failed write only keeps the gate
        closed longer (or open until the next proof)."""
        shown = proof == "serial"
        if self._known.get(vm_id) == shown:
            return
        try:
            if shown:
                await self.bucket.put(
                    vm_id, SerialsShown(operation_id=operation_id, at=now_rfc3339())
                )
            else:
                await self.bucket.delete(vm_id)
        except Exception as e:
            log.warning("could not note how attaches to %s were proven: %s", vm_id, e)
            return
        self._known[vm_id] = shown

    async def shown(self, vm_id: str) -> bool:
        """Whether the devices of ``vm_id`` have shown serials, in any executor process (an
        unreadable bucket counts as no: the gate stays closed, which is safe)."""
        try:
            shown = await self.bucket.get(vm_id) is not None
        except Exception as e:
            log.debug("serials of %s unknown (%s): gated", vm_id, e)
            return False
        self._known[vm_id] = shown
        return shown
