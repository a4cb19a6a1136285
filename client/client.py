"""The volumed client: commands, their events, and the queries, over one NATS connection.

    async with await Client.connect("nats://127.0.0.1:4222") as volumed:
        created = await volumed.create("data-1", 10 * GIB, offering_id, zone_id)
        async with await volumed.send(AttachCommand(volume_id=..., vm_id=...)) as progress:
            async for event in progress:
                print(event.status)
        mapping = await volumed.mapping(volume_id=created.volume_id)

An operation's events are subscribed to before its command is published, so none is missed;
a command sent again with the operation id of one that already ended gets that operation's
latest event again (volumed publishes it), so awaiting it works however late it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

import msgspec

from bus import BadRequest as BusBadRequest
from bus import Bus, Refused, ServiceFailed, ask
from bus import NotFound as BusNotFound
from bus import Unavailable as BusUnavailable
from bus.topology import (
    API_HEALTH,
    API_MAPPING,
    API_OPERATION,
    API_OPERATIONS,
    API_VM_VOLUMES,
    EVENTS,
    EVENTS_PREFIX,
    QuerySpec,
    Rep,
    Req,
    command_subject,
    event_subject,
)
from client.errors import (
    BadRequest,
    NotFound,
    OperationFailed,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DetachCommand,
    ResizeCommand,
    operation_type_of,
    volume_of,
)
from schemas.common import STATUS_RANK, TERMINAL, OpType, Status, is_operation_id
from schemas.config import Settings
from schemas.events import OperationEvent
from schemas.queries import (
    Health,
    HealthQuery,
    Mapping,
    MappingQuery,
    Operation,
    OperationQuery,
    OperationsQuery,
    VmVolumesQuery,
)

log = logging.getLogger("volumed.client")
T = TypeVar("T")

DEFAULT_SERVER = Settings().nats_url  # where the daemon looks by default

_event_decoder = msgspec.json.Decoder(OperationEvent)


def new_operation_id() -> str:
    """An operation id that no other client makes: a random uuid, without dashes."""
    return uuid.uuid4().hex


class Events:
    """Events as they arrive on one subscription, in order; close it (or use ``async
    with``) to unsubscribe."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[OperationEvent] = asyncio.Queue()
        self._unsubscribe: Callable[[], Awaitable[None]] | None = None
        self.gaps = 0
        """How often the connection was lost and came back while subscribed: the events
        published meanwhile are missing here (the operations' records still have them)."""

    def _offer(self, event: OperationEvent) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[OperationEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[OperationEvent]:
        while True:
            yield await self._queue.get()

    async def close(self) -> None:
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            with contextlib.suppress(Exception):  # the connection may be gone already
                await unsubscribe()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Progress(Events):
    """One operation's events as they arrive, ending with its terminal event.

    Iterate it (``async for event in progress``) or await ``result()``. Its status never
    goes backwards: an event that repeats or precedes one already seen is skipped (volumed
    publishes an operation's latest event again whenever its command is re-sent).
    """

    def __init__(self, operation_id: str) -> None:
        super().__init__()
        self.operation_id = operation_id
        self.last: OperationEvent | None = None
        """The newest event seen so far."""
        # The command this client sent (its stream sequence, type and volume), if it did:
        # another command with the same id and another body is rejected `conflict` by an
        # event of its own (``rejected_copy``), and only that command's sender ends on it.
        self.stream_seq: int | None = None
        self.sent: tuple[str, str | None] | None = None

    def _not_ours(self, event: OperationEvent) -> bool:
        if event.rejected_copy is not None:
            return event.rejected_copy != self.stream_seq  # another command's rejection
        if self.stream_seq is None or self.sent is None:
            return False
        # The operation this id names, when this client's command was a conflicting copy.
        op_type, volume_id = self.sent
        other_volume = volume_id is not None and event.volume_id not in (None, volume_id)
        return event.type != op_type or other_volume

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.status in TERMINAL

    async def _events(self) -> AsyncIterator[OperationEvent]:
        while not self.done:
            event = await self._queue.get()
            if self._not_ours(event):
                continue
            if self.last is not None and STATUS_RANK[event.status] <= STATUS_RANK[self.last.status]:
                continue
            self.last = event
            yield event

    async def result(self, timeout: float | None = None) -> OperationEvent:
        """The terminal event once it has arrived, if ``completed``; else raise
        OperationFailed (or OperationRejected, OperationCancelled) with its code and message.
        Raises Timeout when it has not arrived within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async for _ in self:
                    pass
        except TimeoutError:
            raise Timeout(
                f"operation {self.operation_id} did not end within {timeout} s"
                + (f" (it is {self.last.status})" if self.last else " (no event yet)")
            ) from None
        assert self.last is not None
        if self.last.status != "completed":
            raise OperationFailed.of(self.last)
        return self.last


E = TypeVar("E", bound=Events)


class Client:
    """A connection to volumed through NATS; made by ``Client.connect``."""

    def __init__(self, bus: Bus, *, request_timeout: float = 5.0) -> None:
        self.bus = bus
        self.request_timeout = request_timeout
        """Seconds a query, or the acknowledgement of a published command, may take."""
        # Events published while the connection was down never reach a subscription: after
        # a reconnect each open Progress reads its operation's latest stored event again.
        self._following: set[Progress] = set()
        self._watching: set[Events] = set()
        self._catching_up: set[asyncio.Task[None]] = set()
        bus.on_reconnect.append(self._after_reconnect)

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] | None = None,
        *,
        settings: Settings | None = None,
        name: str = "volumed-client",
        timeout: float = 5.0,
        request_timeout: float = 5.0,
    ) -> Client:
        """Connect to NATS as volumed's daemon would with ``settings``: its TLS files, user
        and password or creds file, and inbox prefix (``schemas.config.load_nats_settings()``
        reads them from the same VOLUMED_NATS_* variables). ``servers`` (one URL, a
        comma-separated list, or a list) replaces ``settings.nats_url``; with neither, the
        default server, without TLS or a user.

        Raises Unavailable when no server answers within ``timeout`` seconds, Unauthorized
        at once when NATS refuses the login or TLS fails. Their texts hold no secret."""
        settings = settings or Settings()
        if servers is not None:
            urls = servers if isinstance(servers, str) else ",".join(servers)
            settings = msgspec.structs.replace(settings, nats_url=urls)
        try:
            # The daemon retries for ever; a client gives up in time.
            bus = await Bus.connect_with(settings, name, give_up_after=timeout)
        except BusUnavailable as e:
            raise Unavailable(str(e)) from None
        except Refused as e:
            raise Unauthorized(str(e)) from None
        return cls(bus, request_timeout=request_timeout)

    async def close(self) -> None:
        for task in self._catching_up:
            task.cancel()
        await self.bus.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- commands ------------------------------------------------------------------------------

    async def send(self, command: Command) -> Progress:
        """Publish ``command`` and return its Progress, subscribed before the publish.

        The command's operation id is made here when it has none (``command`` is not
        changed: the id is in ``Progress.operation_id``)."""
        operation_id = command.operation_id or new_operation_id()
        if not is_operation_id(operation_id):
            # volumed would make an id of its own, whose events this client would not see.
            raise BadRequest(
                f"operation_id: must be 1 to 64 characters of A-Z a-z 0-9 _ -, not {operation_id!r}"
            )
        command = msgspec.structs.replace(command, operation_id=operation_id)
        progress = await self._subscribe(operation_id)
        op_type = operation_type_of(command)
        try:
            progress.stream_seq = await self._translated(
                self.bus.publish(command_subject(op_type), command)
            )
            progress.sent = (op_type, volume_of(command))
        except BaseException:
            await progress.close()
            raise
        return progress

    async def execute(self, command: Command, timeout: float | None = None) -> OperationEvent:
        """Send ``command`` and return its ``completed`` event (see ``Progress.result``)."""
        async with await self.send(command) as progress:
            return await progress.result(timeout)

    async def follow(self, operation_id: str) -> Progress:
        """The Progress of an operation sent earlier (by anyone): its latest event so far,
        then each newer one as it arrives."""
        if not is_operation_id(operation_id):
            raise BadRequest(f"not an operation id: {operation_id!r}")
        progress = await self._subscribe(operation_id)
        try:
            await self._catch_up(progress)
        except BaseException:
            await progress.close()
            raise
        return progress

    async def create(
        self,
        name: str,
        size: int,
        disk_offering_id: str,
        zone_id: str,
        *,
        metadata: dict[str, str] | None = None,
        operation_id: str | None = None,
        timeout: float | None = None,
    ) -> OperationEvent:
        """Create a volume of ``size`` bytes (a whole number of GiB); the completed event
        carries its ``volume_id``."""
        command = CreateCommand(
            operation_id=operation_id,
            name=name,
            size=size,
            disk_offering_id=disk_offering_id,
            zone_id=zone_id,
            metadata=metadata,
        )
        return await self.execute(command, timeout)

    async def attach(
        self,
        volume_id: str,
        vm_id: str,
        *,
        as_root: bool = False,
        operation_id: str | None = None,
        timeout: float | None = None,
    ) -> OperationEvent:
        """Attach a volume; an attach to the local VM completes with its ``device_path``."""
        command = AttachCommand(
            operation_id=operation_id, volume_id=volume_id, vm_id=vm_id, as_root=as_root
        )
        return await self.execute(command, timeout)

    async def detach(
        self, volume_id: str, *, operation_id: str | None = None, timeout: float | None = None
    ) -> OperationEvent:
        return await self.execute(
            DetachCommand(operation_id=operation_id, volume_id=volume_id), timeout
        )

    async def delete(
        self, volume_id: str, *, operation_id: str | None = None, timeout: float | None = None
    ) -> OperationEvent:
        """Delete a volume (detached first when attached)."""
        return await self.execute(
            DeleteCommand(operation_id=operation_id, volume_id=volume_id), timeout
        )

    async def resize(
        self,
        volume_id: str,
        size: int,
        *,
        shrink_ok: bool = False,
        operation_id: str | None = None,
        timeout: float | None = None,
    ) -> OperationEvent:
        """Resize a volume to ``size`` bytes (a whole number of GiB); a smaller size fails
        ``invalid_request`` unless ``shrink_ok``. The completed event carries the new
        ``size``; for a volume attached to a host volumed watches it comes once the device
        shows that size (with its ``device_path``)."""
        command = ResizeCommand(
            operation_id=operation_id, volume_id=volume_id, size=size, shrink_ok=shrink_ok
        )
        return await self.execute(command, timeout)

    async def cancel(
        self, target: str, *, operation_id: str | None = None, timeout: float | None = None
    ) -> OperationEvent:
        """Cancel operation ``target`` if it has not started executing (else this cancel
        fails ``not_cancellable``)."""
        return await self.execute(CancelCommand(operation_id=operation_id, target=target), timeout)

    async def events(self) -> Events:
        """Every operation's events published from now on (subscribed when this returns)."""
        events = await self._listen(f"{EVENTS_PREFIX}.>", Events(), self._watching)
        try:
            # Only this connection's own messages are ordered behind the subscription; an
            # event published by volumed right after this returns must not be missed.
            await self._translated(self.bus.flush(self.request_timeout))
        except BaseException:
            await events.close()
            raise
        return events

    async def _subscribe(self, operation_id: str) -> Progress:
        return await self._listen(
            event_subject(operation_id), Progress(operation_id), self._following
        )

    async def _catch_up(self, progress: Progress) -> None:
        """Offer ``progress`` its operation's latest stored event. Read after subscribing:
        it is at least as new as anything the subscription had, and older ones are skipped."""
        latest = await self._translated(
            self.bus.last_message(EVENTS.name, event_subject(progress.operation_id))
        )
        if latest is not None:
            progress._offer(_event_decoder.decode(latest))

    def _after_reconnect(self) -> None:
        for events in self._watching:
            events.gaps += 1
        for progress in self._following:
            if not progress.done:
                task = asyncio.create_task(self._catch_up_quietly(progress))
                self._catching_up.add(task)
                task.add_done_callback(self._catching_up.discard)

    async def _catch_up_quietly(self, progress: Progress) -> None:
        try:
            await self._catch_up(progress)
        except Exception as e:  # the connection went again: its reconnect tries again
            log.warning("cannot read the latest event of %s: %s", progress.operation_id, e)

    async def _listen(self, subject: str, events: E, open_ones: set[E]) -> E:
        """Subscribe ``events`` to ``subject``; it is in ``open_ones`` until it is closed."""

        async def on_event(subject: str, data: bytes, reply: str | None) -> None:
            try:
                event = _event_decoder.decode(data)
            except msgspec.DecodeError as e:
                # Not volumed's (someone published by hand): nothing to follow in it.
                log.warning("ignoring a message on %s that is not an event: %s", subject, e)
                return
            events._offer(event)

        unsubscribe = await self._translated(self.bus.subscribe(subject, on_event))

        async def stop() -> None:
            open_ones.discard(events)
            await unsubscribe()

        events._unsubscribe = stop
        open_ones.add(events)
        return events

    # -- queries -------------------------------------------------------------------------------

    async def operation(self, operation_id: str) -> Operation:
        """The operation's record; NotFound when volumed has none."""
        return await self.ask(API_OPERATION, OperationQuery(operation_id=operation_id))

    async def operations(
        self,
        *,
        type: OpType | None = None,
        status: Status | None = None,
        volume_id: str | None = None,
        vm_id: str | None = None,
        limit: int = 100,
    ) -> list[Operation]:
        """Operations matching every filter given, newest first."""
        query = OperationsQuery(
            type=type, status=status, volume_id=volume_id, vm_id=vm_id, limit=limit
        )
        return (await self.ask(API_OPERATIONS, query)).operations

    async def mapping(
        self,
        *,
        volume_id: str | None = None,
        device_path: str | None = None,
        vm_id: str | None = None,
    ) -> Mapping:
        """The device mapping of an attached volume, or of a device path (of ``vm_id``:
        needed when several VMs have one at that path); NotFound if none."""
        query = MappingQuery(volume_id=volume_id, device_path=device_path, vm_id=vm_id)
        return await self.ask(API_MAPPING, query)

    async def vm_volumes(self, vm_id: str) -> list[Mapping]:
        """The mappings of every volume attached to ``vm_id``."""
        return (await self.ask(API_VM_VOLUMES, VmVolumesQuery(vm_id=vm_id))).volumes

    async def health(self) -> Health:
        return await self.ask(API_HEALTH, HealthQuery())

    async def ask(self, query: QuerySpec[Req, Rep], request: Req) -> Rep:
        """Ask one of volumed's queries (bus.topology.API_QUERIES) with its request type;
        its reply, typed. Raises NotFound, BadRequest, ServiceError, Unavailable, Timeout
        or Unauthorized as the methods above do."""
        return await self._translated(ask(self.bus, query, request, self.request_timeout))

    async def _translated(self, request: Awaitable[T]) -> T:
        """Await a bus request, raising the client's exception for each way it can fail."""
        try:
            return await request
        except BusNotFound as e:
            raise NotFound(str(e)) from None
        except BusBadRequest as e:
            raise BadRequest(str(e)) from None
        except ServiceFailed as e:
            raise ServiceError(e.code, e.text) from None
        except BusUnavailable as e:
            raise Unavailable(f"volumed is not running or not set up here: {e}") from None
        except TimeoutError:
            if "permissions violation" in self.bus.last_error.lower():
                # NATS drops what a user may not do, and says so only in an error callback.
                why = self.bus.last_error.removeprefix("nats: ")
                raise Unauthorized(
                    f"NATS refused this user: {why} (check its permissions in the server's "
                    "accounts, and its inbox prefix: VOLUMED_NATS_INBOX_PREFIX)"
                ) from None
            raise Timeout(f"NATS did not answer within {self.request_timeout} s") from None
