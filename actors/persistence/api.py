"""The query endpoints of the ``volumed`` micro service (contract §4)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from actors.persistence.errors import StoreUnavailable
from actors.persistence.health import HealthChecker
from actors.persistence.read_after import ReadAfter
from actors.persistence.store import Store
from bus import BadRequest, NotFound
from bus.service import EndpointHandler
from bus.topology import ApiQuery, api_subject
from schemas.common import explain_validation_error
from schemas.queries import (
    PATTERN_WORDS,
    Health,
    Mapping,
    MappingQuery,
    Operation,
    OperationQuery,
    Operations,
    OperationsQuery,
    VmVolumes,
    VmVolumesQuery,
)

T = TypeVar("T")

SERVICE_NAME = "volumed"
SERVICE_VERSION = "0.1.0"
SERVICE_DESCRIPTION = "volumed: operations, device mappings and health"


class Api:
    """Decodes requests, asks the store, and answers with the contract's shapes.

    Every query but health first waits (``read_after``) until the database holds every
    event published before it arrived."""

    def __init__(
        self,
        store: Callable[[], Store | None],
        health: HealthChecker,
        read_after: ReadAfter | None = None,
        store_open: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._health = health
        self._read_after = read_after
        self._store_open = store_open
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    def endpoints(self) -> dict[str, tuple[str, EndpointHandler]]:
        handlers: dict[ApiQuery, Callable[[bytes], Awaitable[Any]]] = {
            "operation": self.operation,
            "operations": self.operations,
            "mapping": self.mapping,
            "vm_volumes": self.vm_volumes,
            "health": self.health,
        }
        return {name: (api_subject(name), h) for name, h in handlers.items()}

    def _decode(self, body: bytes, kind: type[T], *, empty: bool = False) -> T:
        if not body.strip():
            if not empty:
                raise BadRequest("the request body is empty: a JSON object was expected")
            body = b"{}"
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.json.Decoder(kind)
        try:
            result: T = decoder.decode(body)
        except msgspec.ValidationError as e:
            raise BadRequest(
                explain_validation_error(str(e), what="request", pattern_words=PATTERN_WORDS)
            ) from None
        except msgspec.DecodeError as e:
            raise BadRequest(f"the request is not valid JSON: {e}") from None
        return result

    async def _db(self) -> Store:
        """The store, once it holds every event published before the query arrived (or
        the wait's bound passed: then as it is, and the lag is logged)."""
        store = self._store()
        if store is None and self._store_open is not None and self._read_after is not None:
            # Starting up: the events before this query wait in the stream for the database,
            # so the query waits for it too, within the same bound.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store_open.wait(), self._read_after.timeout)
            store = self._store()
        if store is None:
            raise StoreUnavailable("the database is not connected yet (volumed health says why)")
        if self._read_after is not None:
            await self._read_after.wait()
        return store

    async def operation(self, body: bytes) -> Operation:
        q = self._decode(body, OperationQuery)
        db = await self._db()
        found = await db.operation(q.operation_id)
        if found is None:
            raise NotFound(f"no operation {q.operation_id!r}")
        return found

    async def operations(self, body: bytes) -> Operations:
        q = self._decode(body, OperationsQuery, empty=True)
        db = await self._db()
        return Operations(operations=await db.operations(q))

    async def mapping(self, body: bytes) -> Mapping:
        q = self._decode(body, MappingQuery)
        if (q.volume_id is None) == (q.device_path is None):
            raise BadRequest("give exactly one of volume_id and device_path")
        if q.vm_id is not None and q.device_path is None:
            raise BadRequest("vm_id goes with device_path")
        db = await self._db()
        if q.volume_id is not None:
            found = await db.mapping_by_volume(q.volume_id)
            what = f"volume {q.volume_id!r}"
        else:
            assert q.device_path is not None
            several = await db.mappings_by_device(q.device_path, q.vm_id)
            if len(several) > 1:
                raise BadRequest(f"several VMs have a mapping at {q.device_path!r}: give vm_id too")
            found = several[0] if several else None
            what = f"device {q.device_path!r}" + (f" of VM {q.vm_id!r}" if q.vm_id else "")
        if found is None:
            raise NotFound(f"no device mapping for {what}: it is not attached")
        return found

    async def vm_volumes(self, body: bytes) -> VmVolumes:
        q = self._decode(body, VmVolumesQuery)
        db = await self._db()
        return VmVolumes(volumes=await db.vm_volumes(q.vm_id))

    async def health(self, body: bytes) -> Health:
        if body.strip():
            try:
                msgspec.json.decode(body)
            except msgspec.DecodeError as e:
                raise BadRequest(f"the request is not valid JSON: {e}") from None
        return await self._health.check()
