"""The query endpoints of the ``volumed`` micro service (contract §4)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from actors.persistence.errors import StoreUnavailable
from actors.persistence.health import HealthChecker
from actors.persistence.read_after import ReadAfter
from actors.persistence.store import Store
from bus import BadRequest, NotFound
from bus.service import EndpointHandler
from bus.topology import (
    API_HEALTH,
    API_MAPPING,
    API_OPERATION,
    API_OPERATIONS,
    API_QUERIES,
    API_VM_VOLUMES,
    QuerySpec,
    Rep,
    Req,
)
from schemas.common import explain_validation_error
from schemas.queries import (
    PATTERN_WORDS,
    Health,
    HealthQuery,
    Mapping,
    MappingQuery,
    Operation,
    OperationQuery,
    Operations,
    OperationsQuery,
    VmVolumes,
    VmVolumesQuery,
)

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
        """Every declared query (bus.topology.API_QUERIES) with its handler, {name: (subject,
        handler)}, in the declaration's order."""
        return endpoints_of(
            self._answering(API_OPERATION, self.operation),
            self._answering(API_OPERATIONS, self.operations),
            self._answering(API_MAPPING, self.mapping),
            self._answering(API_VM_VOLUMES, self.vm_volumes),
            self._answering(API_HEALTH, self.health),
        )

    def _answering(
        self, query: QuerySpec[Req, Rep], handler: Callable[[Req], Awaitable[Rep]]
    ) -> tuple[QuerySpec[Any, Any], EndpointHandler]:
        """``handler`` as the endpoint of ``query``: it gets the request decoded as the
        query's request type (a bad one answers 400 without it)."""

        async def on_body(body: bytes) -> Rep:
            return await handler(self._decode(body, query))

        return query, on_body

    def _decode(self, body: bytes, query: QuerySpec[Req, Any]) -> Req:
        if not body.strip():
            if not query.empty_body:
                raise BadRequest("the request body is empty: a JSON object was expected")
            body = b"{}"
        kind = query.request
        # A request type without fields (health's) takes any JSON, as its "fields are
        # ignored" says: only the body's syntax is checked.
        fieldless = not msgspec.structs.fields(kind)
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.json.Decoder(Any if fieldless else kind)
        try:
            result: Req = decoder.decode(body)
        except msgspec.ValidationError as e:
            raise BadRequest(
                explain_validation_error(str(e), what="request", pattern_words=PATTERN_WORDS)
            ) from None
        except msgspec.DecodeError as e:
            raise BadRequest(f"the request is not valid JSON: {e}") from None
        return kind() if fieldless else result

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

    async def operation(self, q: OperationQuery) -> Operation:
        db = await self._db()
        found = await db.operation(q.operation_id)
        if found is None:
            raise NotFound(f"no operation {q.operation_id!r}")
        return found

    async def operations(self, q: OperationsQuery) -> Operations:
        db = await self._db()
        return Operations(operations=await db.operations(q))

    async def mapping(self, q: MappingQuery) -> Mapping:
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

    async def vm_volumes(self, q: VmVolumesQuery) -> VmVolumes:
        db = await self._db()
        return VmVolumes(volumes=await db.vm_volumes(q.vm_id))

    async def health(self, q: HealthQuery) -> Health:
        return await self._health.check()


def endpoints_of(
    *answered: tuple[QuerySpec[Any, Any], EndpointHandler],
) -> dict[str, tuple[str, EndpointHandler]]:
    """The micro service's endpoints: each declared query's subject and handler. Raises
    RuntimeError (at start, before anything is served) when a declared query has no
    handler, or a handler answers a query not declared or one declared twice."""
    served = [q for q, _ in answered]
    missing = [q.name for q in API_QUERIES if q not in served]
    extra = [q.name for q in served if q not in API_QUERIES]
    twice = sorted({q.name for q in served if served.count(q) > 1})
    if missing or extra or twice:
        raise RuntimeError(
            "the served queries differ from bus.topology.API_QUERIES: "
            f"without a handler {missing}, not declared {extra}, answered twice {twice}"
        )
    handlers = dict(answered)
    return {q.name: (q.subject, handlers[q]) for q in API_QUERIES}
