"""NATS micro services: discoverable endpoints with JSON in and out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.errors import NoRespondersError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from bus.connection import Bus, encode
from bus.errors import BadRequest, NotFound, ServiceFailed, Unavailable
from bus.topology import QuerySpec, Rep, Req

log = logging.getLogger("volumed.bus.service")

EndpointHandler = Callable[[bytes], Awaitable[Any]]


async def serve(
    bus: Bus,
    name: str,
    version: str,
    description: str,
    endpoints: dict[str, tuple[str, EndpointHandler]],
) -> Service:
    """Register ``endpoints`` ({name: (subject, handler)}) as the micro service ``name``.

    A handler takes the request body and returns a Struct or dict (sent as JSON); it raises
    NotFound (→ 404) or BadRequest (→ 400), a ConnectionError (→ 503: what it needs is away,
    the database say); anything else answers 500 without details.
    Endpoints share the service's queue group, so several processes split the load.
    Requests are answered concurrently.
    """
    service = await add_service(
        bus.nc, ServiceConfig(name=name, version=version, description=description)
    )
    encoder = msgspec.json.Encoder()
    answering: set[asyncio.Task[None]] = set()

    def wrap(handler: EndpointHandler) -> Callable[[Request], Awaitable[None]]:
        async def on_request(req: Request) -> None:
            # Each request in a task of its own: nats-py runs a subscription's callbacks one
            # at a time, so one slow answer (a database read, a query waiting for the
            # writers to catch up) would hold up every request behind it.
            task = asyncio.create_task(answer(req))
            answering.add(task)
            task.add_done_callback(answering.discard)

        async def answer(req: Request) -> None:
            try:
                result = await handler(req.data)
            except NotFound as e:
                await req.respond_error("404", str(e))
            except BadRequest as e:
                await req.respond_error("400", str(e))
            except ConnectionError as e:
                # What the answer needs is away (the database not open yet, say): a state
                # to wait out, not a bug, so no traceback per query while it lasts.
                log.warning("endpoint %s: unavailable: %s", req.subject, e)
                await req.respond_error("503", f"unavailable: {e}; try again later")
            except Exception:
                log.exception("endpoint %s failed", req.subject)
                await req.respond_error("500", "internal error; see the volumed log")
            else:
                await req.respond(encoder.encode(result))

        return on_request

    for endpoint_name, (subject, handler) in endpoints.items():
        await service.add_endpoint(
            EndpointConfig(name=endpoint_name, subject=subject, handler=wrap(handler))
        )
    return service


async def call(bus: Bus, subject: str, message: Any, timeout: float = 5.0) -> bytes:
    """Ask a micro service endpoint; return its JSON reply.

    The other side of ``serve``: a 404 raises NotFound, a 400 BadRequest, any other error
    ServiceFailed; no service listening raises Unavailable, no answer in time TimeoutError.
    """
    try:
        reply = await bus.nc.request(subject, encode(message), timeout=timeout)
    except NoRespondersError:
        raise Unavailable(f"no service answers {subject}") from None
    headers = reply.headers or {}
    code = headers.get("Nats-Service-Error-Code")
    if code:
        text = headers.get("Nats-Service-Error", "")
        if code == "404":
            raise NotFound(text)
        if code == "400":
            raise BadRequest(text)
        raise ServiceFailed(code, text)
    return reply.data


_reply_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


async def ask(bus: Bus, query: QuerySpec[Req, Rep], request: Req, timeout: float = 5.0) -> Rep:
    """Ask one of volumed's queries (bus.topology.API_QUERIES): ``call`` on its subject,
    its reply decoded as its reply type (a reply of another shape raises
    msgspec.ValidationError)."""
    data = await call(bus, query.subject, request, timeout)
    decoder = _reply_decoders.get(query.reply)
    if decoder is None:
        decoder = _reply_decoders[query.reply] = msgspec.json.Decoder(query.reply)
    reply: Rep = decoder.decode(data)
    return reply
