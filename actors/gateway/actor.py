"""The REST gateway: the Go daemon's API (contract §7) over volumed's commands and queries.

It never opens the database. A POST publishes the command (``volume.cmd.*``, captured by
JetStream) through ``client.Client`` and answers 201 with the operation as it is once
accepted: its first event says whether it was (``pending`` or later) or was ``rejected``
(400, or 409 for an operation id already used for another command). A GET asks the
``volumed`` micro service. The routes are declared in ``routes.py``; the shapes are
``schemas.rest``, translated from volumed's by ``shapes.py``.

Errors are ``{"error", "code"}``: 400 bad body, 404 unknown id or route, 409 conflict,
413 body over 64 KiB, 501 a route volumed does not offer, 503 NATS (or the service behind
it) away; anything unexpected is logged and answers 500 without details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import msgspec
from aiohttp import web

from actors.gateway import shapes
from actors.gateway.openapi import document
from actors.gateway.routes import NOT_OFFERED, OPERATIONS_FILTERS, ROUTES, Route
from actors.metrics.exporter import bound_port, listen, parse_address
from bus import Bus, call
from bus import Unavailable as BusUnavailable
from bus.topology import API_OPERATIONS, REPROVE_SUBJECT
from client import Client, new_operation_id
from client.errors import (
    BadRequest,
    ClientError,
    NotFound,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from schemas.commands import (
    AttachCommand,
    Command,
    DeleteCommand,
    DetachCommand,
    InvalidCommand,
    decode_command,
    operation_type_of,
    volume_of,
)
from schemas.common import CloudStackId, explain_validation_error, is_operation_id, now_rfc3339
from schemas.config import Settings
from schemas.events import OperationEvent
from schemas.queries import Operation
from schemas.rest import (
    MAX_BODY_BYTES,
    AttachVolumeRequest,
    ErrorBody,
    ForceSyncResult,
)

log = logging.getLogger("volumed.gateway")

DEFAULT_ADDRESS = "127.0.0.1:8090"
"""Where the Go daemon listened: its callers' default."""
ACCEPT_WAIT = 5.0
"""Seconds a POST waits for its operation's first event (pending, or rejected). Past it the
command is in the stream all the same (no executor is running): 201, pending."""
FORCE_SYNC_WAIT = 2.0
SHUTDOWN_GRACE = 2.0

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


class HttpError(Exception):
    """Ends a request with ``status`` and ``{"error": message, "code": code}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(ErrorBody(error=message, code=code), status)


# What aiohttp raises itself (unknown route, wrong method, body too large), as our codes.
_AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure as the error shape; never a traceback to the caller."""
    try:
        return await handler(request)
    except HttpError as e:
        return _error(e.status, e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no route {request.method} {request.path}"
        elif e.status == 413:
            message = f"the body is over {MAX_BODY_BYTES} bytes (64 KiB)"
        else:
            message = f"{e.reason}: {request.method} {request.path}"
        return _error(e.status, _AIOHTTP_CODES.get(e.status, "invalid_request"), message)
    except ClientError as e:
        status, code = _client_error(e)
        return _error(status, code, str(e))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", "internal error; see the volumed log")


def _client_error(e: ClientError) -> tuple[int, str]:
    if isinstance(e, NotFound):
        return 404, "not_found"
    if isinstance(e, BadRequest):
        return 400, "invalid_request"
    if isinstance(e, Unavailable | Timeout | Unauthorized):
        return 503, "unavailable"
    if isinstance(e, ServiceError):
        # The service answered but could not (its database away, say): try again later.
        return 503, "unavailable"
    return 500, "internal"


class GatewayActor:
    """Serves the REST API on ``address`` (host:port) until ``stop``."""

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        address: str | None = None,
        *,
        accept_wait: float = ACCEPT_WAIT,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.address = address or settings.http_addr or DEFAULT_ADDRESS
        self.host, self._port = parse_address(self.address)
        self.client = Client(bus)
        self.accept_wait = accept_wait
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._openapi = _encoder.encode(document())
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    @property
    def port(self) -> int:
        """The port listened on (the system's choice when 0 was asked for)."""
        return bound_port(self._runner, self._port)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
        for route in ROUTES:
            if route.method == "GET":  # and HEAD, as any web server answers
                app.router.add_get(route.path, self._handler(route))
            else:
                app.router.add_route(route.method, route.path, self._handler(route))
        for method, path, what in NOT_OFFERED:
            app.router.add_route(method, path, _not_offered(what))
        return app

    def _handler(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        answer: Callable[[web.Request], Awaitable[Any]] = getattr(self, route.handler)

        async def handle(request: web.Request) -> web.StreamResponse:
            result = await answer(request)
            if isinstance(result, web.StreamResponse):
                return result
            return _json(result, route.status)

        return handle

    async def run(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Listen: a port in use fails here, at start, naming the setting."""
        self._runner = await listen(
            self.app(),
            self.address,
            "the REST API on VOLUMED_HTTP_ADDR",
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        self.ready.set()
        log.info("REST API on http://%s:%d/api/v1", self.host or "*", self.port)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- requests -------------------------------------------------------------------------

    def _nats(self) -> None:
        """503 at once when the connection is down (a request would only time out)."""
        if not self.bus.connected:
            raise HttpError(503, "unavailable", "NATS is not reachable; volumed cannot answer")

    @staticmethod
    async def _read(request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(
                413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes (64 KiB)"
            ) from None

    async def _body(self, request: web.Request, kind: type[T]) -> T:
        data = await self._read(request)
        if not data.strip():
            raise HttpError(400, "invalid_request", "the body is empty: a JSON object was expected")
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.json.Decoder(kind)
        try:
            body: T = decoder.decode(data)
        except msgspec.ValidationError as e:
            raise HttpError(
                400, "invalid_request", explain_validation_error(str(e), what="body")
            ) from None
        except msgspec.DecodeError as e:
            raise HttpError(400, "invalid_request", f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise HttpError(400, "invalid_request", "the body is nested too deeply") from None
        return body

    @staticmethod
    def _operation_id(request: web.Request) -> str:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return new_operation_id()
        if not is_operation_id(key):
            raise HttpError(
                400,
                "invalid_request",
                "Idempotency-Key: must be 1 to 64 characters of A-Z a-z 0-9 _ - "
                "(it becomes the operation id)",
            )
        return key

    @staticmethod
    def _id(request: web.Request, what: str = "volume") -> str:
        """A CloudStack id from the path; one that cannot be an id is unknown (404)."""
        value = request.match_info["id"]
        try:
            return msgspec.convert(value, CloudStackId)
        except msgspec.ValidationError:
            raise HttpError(404, "not_found", f"no {what} {value!r}") from None

    async def _submit(self, command: Command) -> Any:
        """Publish ``command``; the operation once accepted, or the rejection."""
        self._nats()
        now = now_rfc3339()
        try:
            sending = await self.client.send(command)
        except Timeout as e:
            # No acknowledgement, but the command may be in the stream all the same (NATS
            # paused, not gone): say which operation to look for, and how to retry safely.
            raise HttpError(
                503,
                "unavailable",
                f"{e}; the command may have been taken all the same: see GET "
                f"/api/v1/operations/{command.operation_id}, or retry with the header "
                f"Idempotency-Key: {command.operation_id}",
            ) from None
        async with sending as progress:
            first = await self._first_event(progress)
        if first is None:
            return shapes.accepted(command, now)
        if first.status == "rejected":
            if _another_command(command, first, None):
                # The key names an earlier command of another type or volume, rejected:
                # its reason is not this request's.
                raise HttpError(409, "conflict", _key_conflict(command, first))
            error = first.error
            code = error.code if error else "invalid_request"
            message = error.message if error else "the command was rejected"
            raise HttpError(409 if code == "conflict" else 400, code, message)
        assert command.operation_id is not None
        record: Operation | None
        try:
            record = await self.client.operation(command.operation_id)
        except ClientError as e:
            # Accepted all the same; the record is what a later GET shows.
            log.info("operation %s: no record yet (%s)", command.operation_id, e)
            record = None
        if _another_command(command, first, record):
            raise HttpError(409, "conflict", _key_conflict(command, first))
        if record is None:
            return shapes.operation_of_event(first, msgspec.to_builtins(command))
        return shapes.operation(record, now)

    async def _first_event(self, progress: Any) -> OperationEvent | None:
        """The operation's first event within ``accept_wait`` (0: do not wait), or None."""
        if self.accept_wait <= 0:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.accept_wait):
                async for event in progress:
                    return event
        return None

    # -- commands -------------------------------------------------------------------------

    async def create(self, request: web.Request) -> Any:
        operation_id = self._operation_id(request)
        # The body is a create command's (schemas.rest.CreateVolumeRequest documents it):
        # decoded as volumed decodes one, so a refusal reads the same through either door.
        try:
            command = decode_command("create", await self._read(request))
        except InvalidCommand as e:
            raise HttpError(400, "invalid_request", str(e)) from None
        return await self._submit(msgspec.structs.replace(command, operation_id=operation_id))

    async def _attach(self, request: web.Request, as_root: bool) -> Any:
        operation_id = self._operation_id(request)
        volume_id = self._id(request)
        body = await self._body(request, AttachVolumeRequest)
        command = AttachCommand(
            operation_id=operation_id, volume_id=volume_id, vm_id=body.vm_id, as_root=as_root
        )
        return await self._submit(command)

    async def attach(self, request: web.Request) -> Any:
        return await self._attach(request, as_root=False)

    async def attach_root(self, request: web.Request) -> Any:
        return await self._attach(request, as_root=True)

    async def detach(self, request: web.Request) -> Any:
        operation_id = self._operation_id(request)
        volume_id = self._id(request)
        await self._read(request)  # none is expected; one too large still answers 413
        return await self._submit(DetachCommand(operation_id=operation_id, volume_id=volume_id))

    async def delete(self, request: web.Request) -> Any:
        operation_id = self._operation_id(request)
        volume_id = self._id(request)
        await self._read(request)  # none is expected; one too large still answers 413
        return await self._submit(DeleteCommand(operation_id=operation_id, volume_id=volume_id))

    # -- queries --------------------------------------------------------------------------

    async def operation(self, request: web.Request) -> Any:
        operation_id = request.match_info["id"]
        if not is_operation_id(operation_id):
            raise HttpError(404, "not_found", f"no operation {operation_id!r}")
        self._nats()
        return shapes.operation(await self.client.operation(operation_id), now_rfc3339())

    async def operations(self, request: web.Request) -> Any:
        given = {k: v for k, v in request.query.items() if k in OPERATIONS_FILTERS and v}
        try:
            # strict=False: "limit=10" from a query string is a number.
            q = msgspec.convert(given, API_OPERATIONS.request, strict=False)
        except msgspec.ValidationError as e:
            raise HttpError(
                400, "invalid_request", explain_validation_error(str(e), what="query")
            ) from None
        self._nats()
        found = (await self.client.ask(API_OPERATIONS, q)).operations
        now = now_rfc3339()
        return [shapes.operation(op, now) for op in found]

    async def volume(self, request: web.Request) -> Any:
        volume_id = self._id(request)
        self._nats()
        mapping, ops = await asyncio.gather(
            self._mapping_or_none(volume_id), self.client.operations(volume_id=volume_id)
        )
        if mapping is None and not ops:
            raise HttpError(404, "not_found", f"volumed knows no volume {volume_id!r}")
        return shapes.volume_status(volume_id, mapping, ops, now_rfc3339())

    async def _mapping_or_none(self, volume_id: str) -> Any:
        try:
            return await self.client.mapping(volume_id=volume_id)
        except NotFound:
            return None

    async def volume_device(self, request: web.Request) -> Any:
        volume_id = self._id(request)
        self._nats()
        return shapes.mapping(await self.client.mapping(volume_id=volume_id))

    async def device_volume(self, request: web.Request) -> Any:
        # The Go daemon's callers give the path without its leading "/" (dev/vdb).
        path = "/" + request.match_info["path"].lstrip("/")
        # A device path is unique per VM: several hosts sharing one database may each have a
        # /dev/vdb. ``?vm_id=`` picks one; else this host's VM (VOLUMED_VM_ID), if set.
        vm_id = request.query.get("vm_id") or self.settings.vm_id
        self._nats()
        return shapes.mapping(await self.client.mapping(device_path=path, vm_id=vm_id))

    async def vm_volumes(self, request: web.Request) -> Any:
        vm_id = self._id(request, "VM")
        self._nats()
        mappings = await self.client.vm_volumes(vm_id)
        attached = await asyncio.gather(*(self._attached_at(m.operation_id) for m in mappings))
        return [shapes.vm_volume(m, at) for m, at in zip(mappings, attached, strict=True)]

    async def _attached_at(self, operation_id: str | None) -> str | None:
        """When the attach that made a mapping completed (None: not known, e.g. a mapping
        imported from the Go daemon's table)."""
        if operation_id is None:
            return None
        try:
            return (await self.client.operation(operation_id)).completed_at
        except NotFound:
            return None

    async def health(self, request: web.Request) -> Any:
        self._nats()
        try:
            checked = await self.client.health()
        except (Unavailable, Timeout) as e:
            # Persistence answers health (it gathers every actor's): while it does not (not
            # started yet, or its process is gone), a Go caller still gets its own shape,
            # unhealthy, rather than an error body it cannot decode.
            document = shapes.unanswered_health(f"{e}", now_rfc3339())
            return _json(document, 503)
        document = shapes.health(checked, now_rfc3339())
        return _json(document, 503 if checked.status == "down" else 200)

    async def force_sync(self, request: web.Request) -> Any:
        """Every correlator (one per host) proves its VM's mappings again now, as it does
        when a device changes; the proofs reach the mappings (``proven_at``) moments later.
        Answered by the first correlator: the others have the same request."""
        self._nats()
        try:
            data = await call(self.bus, REPROVE_SUBJECT, {}, timeout=FORCE_SYNC_WAIT)
        except (BusUnavailable, TimeoutError):
            raise HttpError(
                503, "unavailable", "no correlator is running: nothing proves the mappings"
            ) from None
        answer = msgspec.json.decode(data)
        vm_id = str(answer.get("vm_id") or "") if isinstance(answer, dict) else ""
        return ForceSyncResult(
            message=f"the correlators prove their mappings again (first answer: VM {vm_id})",
            timestamp=now_rfc3339(),
            vm_ids=[vm_id] if vm_id else [],
        )

    async def openapi(self, request: web.Request) -> Any:
        return web.Response(body=self._openapi, content_type="application/json")


def _another_command(command: Command, first: OperationEvent, record: Operation | None) -> bool:
    """Whether the operation id already names a different command (an Idempotency-Key
    reused for another request): volumed answers a known id with that operation's events,
    whatever the body, so the gateway compares what it sent with what the id holds."""
    if first.type != operation_type_of(command):
        return True
    volume = volume_of(command)
    if volume is not None and first.volume_id not in (None, volume):
        return True
    if record is None or record.request is None:
        return False
    try:
        stored = msgspec.convert(record.request, type(command))
    except msgspec.ValidationError:
        return True
    return msgspec.structs.replace(stored, operation_id=command.operation_id) != command


def _key_conflict(command: Command, first: OperationEvent) -> str:
    return (
        f"operation {command.operation_id} (the Idempotency-Key) is another "
        f"{first.type} command; a retry must send the same request"
    )


def _not_offered(what: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> NoReturn:
        raise HttpError(
            501,
            "not_implemented",
            f"volumed does not offer {request.method} {request.path} ({what}); "
            "see docs/rest-api.md",
        )

    return handle
