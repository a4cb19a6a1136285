"""A TCP proxy that a test puts between one process and its server, to cut that one
process's connection for a while (a network blip) without touching the server or the
other processes.

    proxy = TcpProxy("127.0.0.1", nats_server.port)
    await proxy.start()            # then give the process proxy.url instead of the server's
    await proxy.cut(5.0)           # drop its connections now; refuse new ones for 5 s
    await proxy.healed()           # (optional) wait until the cut is over

A cut resets every open connection at once (both ends see the reset, as after a router
restart), and for ``seconds`` every new connection is accepted and closed at once, so the
process's reconnect attempts fail until the cut is over. Runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("tests.tcp_proxy")

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (a free port unless given) to ``host``:``target_port``."""

    def __init__(self, host: str, target_port: int, port: int = 0) -> None:
        self.host = host
        self.target_port = target_port
        self.port = port
        self.accepted = 0
        """Connections forwarded to the server so far (a reconnect adds one)."""
        self.refused = 0
        """Connections closed at once because a cut was on."""
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._healed = asyncio.Event()
        self._healed.set()
        self._heal_at: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def cutting(self) -> bool:
        return not self._healed.is_set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._heal_at is not None:
            self._heal_at.cancel()
        if self._server is not None:
            self._server.close()
        self._drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def cut(self, seconds: float) -> None:
        """Reset every connection now and refuse new ones for ``seconds`` (a cut already on
        is lengthened to end ``seconds`` from now)."""
        self.cuts += 1
        self._healed.clear()
        if self._heal_at is not None:
            self._heal_at.cancel()
        self._heal_at = asyncio.get_running_loop().call_later(seconds, self.heal)
        self._drop()
        log.info("proxy %d: cut for %.1f s", self.port, seconds)
        await asyncio.sleep(0)  # the resets are on their way before this returns

    def heal(self) -> None:
        """End the cut now: new connections are forwarded again."""
        if self._heal_at is not None:
            self._heal_at.cancel()
            self._heal_at = None
        self._healed.set()

    async def healed(self) -> None:
        await self._healed.wait()

    def _drop(self) -> None:
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cutting:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self.cutting:  # a cut began while connecting
            self.refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.accepted += 1
        link = (writer, up_writer)
        self._links.add(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, sink, lambda: self._links.discard(link)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, ended: Callable[[], None]
) -> None:
    """Copy until either side ends; then end the other side too."""
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        ended()
        with contextlib.suppress(Exception):
            sink.close()
