"""Kernel uevents over AF_NETLINK / NETLINK_KOBJECT_UEVENT.

Only the kernel's multicast group (1) is read. udev re-broadcasts on group 2 in its own
binary format after its rules ran; anyone with CAP_NET_ADMIN could send those, so they are
not trusted here. Kernel messages are checked to come from port id 0 (the kernel).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_RCVBUF = 4 * 1024 * 1024  # a burst of hot-plugs (or a `udevadm trigger`) must not overflow


@dataclass(frozen=True, slots=True)
class Uevent:
    """One kernel uevent: ``ACTION@DEVPATH`` and its KEY=VALUE environment."""

    action: str
    devpath: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devtype(self) -> str:
        return self.env.get("DEVTYPE", "")

    @property
    def name(self) -> str:
        """The kernel name as in ``/sys/block`` (``/`` in DEVNAME is ``!`` there)."""
        return os.path.basename(self.devpath)

    @property
    def is_block_disk(self) -> bool:
        return (
            self.subsystem == "block"
            and self.devtype == "disk"
            and self.action in ("add", "remove", "change")
        )


def parse_uevent(data: bytes) -> Uevent | None:
    """Parse a kernel message ``ACTION@DEVPATH\\0KEY=VALUE\\0...``; None for anything else
    (udev's ``libudev`` messages, garbage)."""
    parts = data.split(b"\0")
    header = parts[0].decode("utf-8", "replace")
    action, at, devpath = header.partition("@")
    if not at or not action or not devpath.startswith("/"):
        return None
    env: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition(b"=")
        if eq and key:
            env[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return Uevent(env.get("ACTION", action), env.get("DEVPATH", devpath), env)


class UeventSocket:
    """A non-blocking netlink socket on the kernel's uevent group.

    Raises OSError on creation where netlink is unavailable (not Linux, a sandbox without
    it, no permission).
    """

    def __init__(self, rcvbuf: int = _RCVBUF) -> None:
        if not hasattr(socket, "AF_NETLINK"):
            raise OSError(errno.EAFNOSUPPORT, "netlink needs Linux")
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_KOBJECT_UEVENT,
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
            except OSError:  # not root: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, KERNEL_GROUP))
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> tuple[list[bytes], bool]:
        """Every kernel message waiting now, and whether some were lost (ENOBUFS: the
        receive buffer overflowed, so the caller must rescan)."""
        messages: list[bytes] = []
        overflowed = False
        while True:
            try:
                data, address = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return messages, overflowed
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    overflowed = True
                    continue
                raise
            if address[0] == 0:  # port id 0: sent by the kernel, not a process
                messages.append(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UeventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_reader(
    sock: UeventSocket, callback: Callable[[], None], loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """Call ``callback`` whenever the socket is readable; returns the function that stops it."""
    fd = sock.fileno()
    loop.add_reader(fd, callback)

    def stop() -> None:
        loop.remove_reader(fd)

    return stop


async def block_uevents(sock: UeventSocket) -> AsyncIterator[tuple[Uevent, bool]]:
    """Block-disk uevents (add, remove, change) as they arrive, each with whether messages
    were lost just before it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Uevent, bool]] = asyncio.Queue()

    def on_readable() -> None:
        messages, overflowed = sock.receive()
        for raw in messages:
            event = parse_uevent(raw)
            if event is not None and event.is_block_disk:
                queue.put_nowait((event, overflowed))
                overflowed = False

    stop = add_reader(sock, on_readable, loop)
    try:
        while True:
            yield await queue.get()
    finally:
        stop()
