"""The one connection to NATS, and everything actors do with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

import msgspec
from nats.aio.client import Client
from nats.errors import AuthorizationError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from bus.errors import Conflict, Refused, Unavailable
from bus.kv import Bucket, is_wrong_last_sequence
from bus.refusals import StoreRefusal, StoreRefusals
from bus.tasks import Backoff
from bus.topology import BucketSpec, ConsumerSpec, StreamSpec, Topology
from schemas.config import (
    ConfigError,
    Settings,
    mask_secrets,
    mask_url_password,
    split_url,
    url_secrets,
)

log = logging.getLogger("volumed.bus")
T = TypeVar("T")

_encoder = msgspec.json.Encoder()
# Bus.messages: how long the next message may take before the stream counts as read (only
# a filter that matches nothing more waits this long; the last message ends it at once).
_MESSAGES_IDLE = 2.0


def encode(message: Any) -> bytes:
    return message if isinstance(message, bytes) else _encoder.encode(message)


@dataclass(frozen=True)
class ConsumerProgress:
    """How far a durable consumer has got (its consumer info), as checked on nats-server
    2.9.10 and 2.15: the ack floor passes terminated messages as well as acked ones; a
    consumer with a filter keeps its floor at the last message it matched."""

    ack_floor: int
    """Every message of the stream up to this sequence has been acked or terminated."""
    idle: bool
    """Nothing waits to be delivered and nothing delivered waits for its ack."""

    def covers(self, stream_seq: int) -> bool:
        """Whether every message up to ``stream_seq`` is done (for a ``stream_seq`` read
        before this progress was; ``idle`` also covers messages a filter skips)."""
        return self.idle or self.ack_floor >= stream_seq


@dataclass(frozen=True)
class StoredMessage:
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int


class Bus:
    """An open NATS connection with JetStream; created by ``Bus.connect``."""

    def __init__(self, nc: Client, js: JetStreamContext, name: str) -> None:
        self.nc = nc
        self.js = js
        self.name = name
        self.reconnects = 0
        self.closing = False
        self.last_error: str = ""
        # Called (synchronously) after every reconnect, e.g. to wake a pull loop.
        self.on_reconnect: list[Callable[[], None]] = []
        # Publishes and KV writes refused for want of room, until they succeed again.
        self.refusals = StoreRefusals()

    @classmethod
    async def connect_with(
        cls, settings: Settings, name: str, *, give_up_after: float | None = None
    ) -> Bus:
        """Connect as ``settings`` say: URL(s), TLS files, user and password or creds file,
        inbox prefix. The one place that turns settings into a connection, for the daemon
        and the clients alike."""
        return await cls.connect(
            settings.nats_url,
            name,
            tls_ca=settings.nats_tls_ca,
            tls_cert=settings.nats_tls_cert,
            tls_key=settings.nats_tls_key,
            user=settings.nats_user,
            password=settings.nats_password,
            creds=settings.nats_creds,
            inbox_prefix=settings.inbox_prefix,
            secrets=settings.secrets(),
            give_up_after=give_up_after,
        )

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        name: str,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        inbox_prefix: str = "_INBOX",
        secrets: Iterable[str] = (),
        give_up_after: float | None = None,
    ) -> Bus:
        """Connect; by default retrying for ever at start too: for the daemon a NATS restart
        is an outage, not a crash.

        ``tls_ca`` (the server's CA), ``tls_cert`` and ``tls_key`` (this client's certificate,
        for a server that verifies clients) are PEM files; any of them, or a tls:// URL,
        makes the connection TLS. ``user`` and ``password``, or a ``creds`` file, say who
        this process is (deploy/nats-accounts/); ``inbox_prefix`` is where its replies
        come (that user's own, see ``Settings.inbox_prefix``).

        ``give_up_after`` (seconds), for clients that a person waits for: raise Refused at
        the first refusal (login, certificate), Unavailable when no server answered in
        time. Error texts never hold ``secrets`` nor a URL's password."""
        urls = [u.strip() for u in servers.split(",")] if isinstance(servers, str) else servers
        secrets = list(secrets) + [p for url in urls for p in url_secrets(url)]
        options: dict[str, Any] = {}
        if tls_ca or tls_cert:
            # Files that cannot be used fail here, at once, not in the retry loop below.
            try:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_ca)
                if tls_cert:
                    context.load_cert_chain(tls_cert, tls_key)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                files = ", ".join(f for f in (tls_ca, tls_cert, tls_key) if f)
                raise ConfigError(f"cannot use the TLS files {files}: {e}") from None
            options["tls"] = context
        if user:
            options.update(user=user, password=password or "")
        if creds:
            options["user_credentials"] = creds
        holder: dict[str, Bus] = {}
        # Only a client that gives up listens for refusals (the daemon retries them too).
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        failures: list[str] = []  # before the first connection: why none was made

        async def on_error(e: Exception) -> None:
            if holder:
                holder["bus"].last_error = mask_secrets(str(e), secrets)
            else:
                failures[:] = [mask_secrets(str(e) or type(e).__name__, secrets)]
            if give_up_after is not None and _is_refusal(e) and not refused.done():
                refused.set_result(e)
            log.warning("nats error: %s", e)

        async def on_disconnected() -> None:
            if holder and holder["bus"].closing:
                return
            log.warning("nats disconnected")

        async def on_reconnected() -> None:
            if holder:
                bus = holder["bus"]
                bus.reconnects += 1
                for wake in bus.on_reconnect:
                    wake()
            log.info("nats reconnected")

        async def attempt() -> Client:
            nc = Client()
            connecting = asyncio.ensure_future(
                nc.connect(
                    servers=urls,
                    name=name,
                    connect_timeout=2,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # a float works
                    # nats-py also retries the first connection for ever with this.
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    # Buffer publishes made during a short outage instead of failing them.
                    pending_size=64 * 1024 * 1024,
                    inbox_prefix=inbox_prefix,
                    **options,
                )
            )
            try:
                both: set[asyncio.Future[Any]] = {connecting, refused}
                await asyncio.wait(both, timeout=give_up_after, return_when=FIRST_COMPLETED)
                if refused.done():
                    raise Refused(_refusal_text(refused.result(), urls, user, creds, secrets))
                if not connecting.done():
                    why = f" ({failures[-1]})" if failures else ""
                    raise Unavailable(
                        f"no NATS server answered within {give_up_after} s at {_hosts(urls)}{why}"
                    )
                connecting.result()
                return nc
            except BaseException:
                # Cancelled, refused or too late: a half-made connection must not go on
                # retrying in the background.
                await _cancel_connect(connecting)
                with contextlib.suppress(Exception):
                    await nc.close()
                raise

        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                nc = await attempt()
                break
            except (Refused, Unavailable):
                raise
            except Exception as e:
                if give_up_after is not None:
                    # Not a refusal: a malformed URL, an option nats-py does not take.
                    text = mask_secrets(str(e), secrets)
                    raise Unavailable(f"cannot connect to NATS at {_hosts(urls)}: {text}") from None
                # Not up yet (a restart in progress): an outage at start is waited out too.
                log.warning("cannot connect to nats (%s); retrying in %.1f s", e, backoff.delay)
                await backoff.pause()
        bus = cls(nc, nc.jetstream(timeout=5.0), name)
        holder["bus"] = bus
        return bus

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def close(self) -> None:
        self.closing = True
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:
                await self.nc.close()

    # -- provisioning ---------------------------------------------------------------------

    async def provision(self, topology: Topology, replicas: int = 1) -> None:
        """Create the streams, consumers and buckets that are missing and bring existing ones
        to the settings declared (where the server allows the change). Idempotent."""
        for stream in topology.streams:
            await self._ensure_stream(stream, replicas)
        for consumer in topology.consumers:
            await self._ensure_consumer(consumer)
        for bucket in topology.buckets:
            await self._ensure_bucket(bucket, replicas)

    async def _ensure_stream(self, spec: StreamSpec, replicas: int) -> None:
        config = StreamConfig(
            name=spec.name,
            description=spec.description or None,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if spec.storage == "file" else StorageType.MEMORY,
            max_age=spec.max_age or None,
            duplicate_window=spec.duplicate_window or 120.0,
            max_msgs_per_subject=spec.max_msgs_per_subject,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
        )
        try:
            await self.js.stream_info(spec.name)
        except NotFoundError:
            await self.js.add_stream(config)
            return
        try:
            await self.js.update_stream(config)
        except BadRequestError as e:
            log.warning("stream %s exists with another config that cannot change: %s", spec.name, e)

    async def _ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the consumer, or update it when its settings differ from ``spec`` (a server
        provisioned by an older volumed keeps the old ack wait and backoff otherwise)."""
        config = ConsumerConfig(
            durable_name=spec.durable,
            description=spec.description or None,
            filter_subject=spec.filter_subject,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            backoff=list(spec.backoff) or None,
            max_ack_pending=spec.max_ack_pending,
        )
        try:
            info = await self.js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            info = None
        if info is not None and _consumer_matches(info.config, spec):
            return
        try:
            # Creates it, or updates the settings a server lets change on an existing one.
            await self.js.add_consumer(spec.stream, config)
        except BadRequestError as e:
            # Another process created it in the meantime, or the server lacks a feature.
            log.warning("consumer %s.%s not created or updated: %s", spec.stream, spec.durable, e)
            await self.js.consumer_info(spec.stream, spec.durable)

    async def _ensure_bucket(self, spec: BucketSpec, replicas: int) -> None:
        """Create the bucket, or give an existing one the retention ``spec`` asks for."""
        try:
            await self.js.key_value(spec.name)
        except Exception:
            await self.js.create_key_value(
                KeyValueConfig(
                    bucket=spec.name,
                    description=spec.description or None,
                    history=spec.history,
                    ttl=spec.ttl or None,
                    replicas=replicas,
                )
            )
            return
        stream = f"KV_{spec.name}"
        config = (await self.js.stream_info(stream)).config
        same_age = abs((config.max_age or 0.0) - spec.ttl) < 1e-3
        if same_age and (config.num_replicas or 1) == replicas:
            return
        # A bucket made before VOLUMED_STREAM_REPLICAS was raised follows it, like a stream.
        config.num_replicas = replicas
        config.max_age = spec.ttl
        if spec.ttl:
            # The server refuses a dedupe window longer than the retention.
            config.duplicate_window = min(config.duplicate_window or 120.0, spec.ttl)
        try:
            await self.js.update_stream(config)
        except BadRequestError as e:
            log.warning("bucket %s keeps its retention and replicas: %s", spec.name, e)

    # -- messaging ------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        message: Any,
        *,
        msg_id: str | None = None,
        if_last: int | None = None,
    ) -> int:
        """Publish to a stream and wait for its acknowledgement; return the stream sequence.

        ``if_last``: store it only if the stream's last message on ``subject`` is still that
        sequence (0: none), else raise Conflict: a publish-if-last, race-free across
        processes. Note that core subscribers receive a refused message all the same; only
        the stream (and what reads it) is protected. Raises Unavailable when no stream
        captures ``subject``."""
        headers: dict[str, str] = {}
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        if if_last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(if_last)
        try:
            ack = await self.js.publish(subject, encode(message), headers=headers or None)
        except NoStreamResponseError:
            raise Unavailable(f"no stream captures {subject}") from None
        except BadRequestError as e:
            if if_last is not None and is_wrong_last_sequence(e):
                raise Conflict(subject) from e
            self.refusals.refused(_place(subject), subject, e)
            raise
        except APIError as e:
            self.refusals.refused(_place(subject), subject, e)
            raise
        self.refusals.stored(_place(subject))
        return ack.seq

    @property
    def store_refusal(self) -> StoreRefusal | None:
        """Why JetStream refuses this process's writes now, if it does."""
        return self.refusals.current()

    async def publish_core(self, subject: str, message: Any) -> None:
        """Fire-and-forget publish (no stream)."""
        await self.nc.publish(subject, encode(message))

    async def request(self, subject: str, message: Any, timeout: float = 5.0) -> bytes:
        reply = await self.nc.request(subject, encode(message), timeout=timeout)
        return reply.data

    async def subscribe(
        self,
        subject: str,
        handler: Callable[[str, bytes, str | None], Awaitable[None]],
        queue: str = "",
    ) -> Callable[[], Awaitable[None]]:
        """Core subscription; returns its unsubscribe function."""

        async def cb(msg: Any) -> None:
            await handler(msg.subject, msg.data, msg.reply or None)

        sub = await self.nc.subscribe(subject, queue=queue, cb=cb)
        return sub.unsubscribe

    async def flush(self, timeout: float = 5.0) -> None:
        """Return once the server has processed everything sent so far: a subscription
        made before is then in effect for messages that others publish.

        Twice, because one nats-py flush does not promise that: it writes its PING straight
        to the socket (nats-py 2.16, Client._send_ping) while a SUB or PUB made just before
        still waits in its pending buffer for the flusher task. So the PING can go out first,
        and its PONG can come back before the server has read the SUB (nats-server reads
        each connection on its own, so another connection's publish can overtake the SUB).
        The flusher was woken before the first PING was written, and it runs before the
        PONG is handled. So once the first PONG is back, everything from before the first
        flush is on the socket, ahead of the second PING."""
        whole = math.ceil(timeout)  # nats-py takes whole seconds
        await self.nc.flush(whole)
        await self.nc.flush(whole)

    async def respond(self, reply: str, message: Any) -> None:
        await self.nc.publish(reply, encode(message))

    async def stored(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at ``seq`` in ``stream``, if it is still there."""
        try:
            msg = await self.js.get_msg(stream, seq)
        except NotFoundError:
            return None
        return StoredMessage(
            subject=msg.subject or "",
            data=msg.data or b"",
            headers=dict(msg.headers or {}),
            stream_seq=seq,
        )

    async def messages(
        self, stream: str, *, subject: str = ">", start: int = 1
    ) -> AsyncIterator[StoredMessage]:
        """Every message stored in ``stream`` from sequence ``start`` on whose subject
        matches ``subject`` (wildcards allowed), in stream order, up to the last one stored
        when called: through an ordered consumer of its own (no acks, gone afterwards), for
        operators' commands (a rebuild, the dead letters)."""
        state = (await self.js.stream_info(stream)).state
        last = state.last_seq
        if not state.messages or last < start:
            return
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start),
            inactive_threshold=60.0,
        )
        sub = await self.js.subscribe(
            subject, stream=stream, ordered_consumer=True, config=config, idle_heartbeat=1.0
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_MESSAGES_IDLE)
                except NatsTimeoutError:
                    return  # nothing more matches ``subject``
                meta = msg.metadata
                yield StoredMessage(
                    subject=msg.subject,
                    data=msg.data,
                    headers=dict(msg.headers or {}),
                    stream_seq=meta.sequence.stream,
                )
                if meta.num_pending == 0 or meta.sequence.stream >= last:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def delete_stored(self, stream: str, seq: int) -> None:
        """Remove the message at ``seq`` from ``stream`` (gone already: no error)."""
        with contextlib.suppress(NotFoundError):
            await self.js.delete_msg(stream, seq)

    async def last_stored(self, stream: str, subject: str) -> StoredMessage | None:
        """The newest message stored on ``subject`` in ``stream``, if any."""
        try:
            msg = await self.js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        return StoredMessage(
            subject=msg.subject or subject,
            data=msg.data or b"",
            headers=dict(msg.headers or {}),
            stream_seq=msg.seq or 0,
        )

    async def last_message(self, stream: str, subject: str) -> bytes | None:
        """The data of the newest message stored on ``subject`` in ``stream``, if any."""
        stored = await self.last_stored(stream, subject)
        return stored.data if stored is not None else None

    async def consumer_progress(self, spec: ConsumerSpec) -> ConsumerProgress:
        """The consumer's ack floor, from the server (one consumer info request)."""
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return ConsumerProgress(
            ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
            idle=not info.num_pending and not info.num_ack_pending,
        )

    async def consumer_exists(self, spec: ConsumerSpec) -> bool:
        try:
            await self.js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            return False
        return True

    async def last_sequence(self, stream: str) -> int:
        """The sequence of the newest message in ``stream`` (0 if it never had one)."""
        info = await self.js.stream_info(stream)
        return info.state.last_seq

    async def first_sequence(self, stream: str) -> int:
        """The sequence of the oldest message still in ``stream`` (those before it aged out or
        were removed); past the last one when it holds none."""
        info = await self.js.stream_info(stream)
        return info.state.first_seq

    async def bucket(self, spec: BucketSpec, value_type: type[T]) -> Bucket[T]:
        kv = await self.js.key_value(spec.name)
        return Bucket(self.js, spec.name, kv, value_type, refusals=self.refusals)

    async def ping(self) -> float:
        """Round trip to the JetStream API in seconds (raises when JetStream is unusable)."""
        start = time.perf_counter()
        await self.js.account_info()
        return time.perf_counter() - start


async def _cancel_connect(connecting: asyncio.Future[Any]) -> None:
    """Cancel nats-py's first connect and wait until it has ended.

    One cancel is not always enough: on Python 3.11, a ``wait_for`` cancelled just as its
    connection is refused raises the refusal instead (python/cpython#86296), and nats-py's
    retry loop takes that for one more failed attempt and goes on for ever. Seen as a
    `volumed run` that a SIGTERM did not end while NATS was down."""
    while not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=0.1)
    if not connecting.cancelled():
        connecting.exception()  # retrieved: no "exception was never retrieved" at exit


def _is_refusal(e: Exception) -> bool:
    """Whether NATS refused who we are (or TLS failed): trying again cannot help."""
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False  # the server went away mid-handshake (a restart): not about us
    if isinstance(e, ssl.SSLError | AuthorizationError):
        return True
    text = str(e).lower()
    return any(
        words in text
        for words in ("authorization violation", "authentication expired", "authentication revoked")
    )


def _refusal_text(
    e: Exception, urls: list[str], user: str | None, creds: str | None, secrets: list[str]
) -> str:
    """Why the connection was refused, in words a person can act on: never a secret."""
    reason = mask_secrets(str(e), secrets).removeprefix("nats: ").strip("'")
    if isinstance(e, ssl.SSLError):
        return f"TLS with NATS at {_hosts(urls)} failed: {reason}"
    user = user or unquote(split_url(urls[0]).user or "")
    if user:
        who, check = f"user {user!r}", "the user name and its password"
    elif creds:
        who, check = f"the creds file {creds}", "the creds file"
    else:
        who, check = "this client", "whether the server wants a user (VOLUMED_NATS_USER)"
    return f"NATS at {_hosts(urls)} refused {who} ({reason}): check {check}"


def _place(subject: str) -> str:
    """Where a publish on ``subject`` is stored, for the refusals: its subject without the
    last token (volume.events.<id> -> volume.events), one stream's worth of subjects."""
    return subject.rsplit(".", 1)[0]


def _hosts(urls: list[str]) -> str:
    """The URLs for a message: never a password."""
    return ",".join(mask_url_password(url) for url in urls)


def _consumer_matches(config: ConsumerConfig, spec: ConsumerSpec) -> bool:
    return (
        abs((config.ack_wait or 0.0) - spec.ack_wait) < 1e-3
        and config.max_deliver == spec.max_deliver
        and tuple(config.backoff or ()) == spec.backoff
        and config.max_ack_pending == spec.max_ack_pending
        and (config.filter_subject or None) == spec.filter_subject
    )
