"""Every API call the simulator saw, for tests that count what a client really sent."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Mapping

from msgspec import Struct

# Never kept: they differ on every request and say nothing about what was asked.
UNLOGGED_PARAMS = frozenset({"signature", "apikey", "expires", "signatureversion"})

MUTATIONS = frozenset(
    {"createVolume", "attachVolume", "detachVolume", "resizeVolume", "deleteVolume"}
)
"""The commands that change a volume."""


class Call(Struct, kw_only=True):
    """One request to the API endpoint."""

    seq: int
    """Increases by one per call, so a test can ask for the calls after a point."""
    at: float
    """time.time() when the request arrived."""
    method: str
    command: str | None
    params: dict[str, str]
    """The request's parameters without command, signature, apiKey, expires, signatureVersion."""
    status: int | None = None
    """HTTP status answered; None when the connection was dropped."""
    jobid: str | None = None
    errortext: str | None = None
    fault: str | None = None
    """The kind of injected fault that hit this call, if any."""
    accepted: bool = False
    """The simulator took the command (its answer was a success, whether or not the client
    got it): a mutation's change is made or its job started."""
    volume_id: str | None = None
    """The volume the call is about: its ``id`` parameter, or the one a createVolume made."""

    def matches(self, command: str | None, params: Mapping[str, str]) -> bool:
        if command is not None and self.command != command:
            return False
        return all(self.params.get(k) == v for k, v in params.items())


class CallLog:
    """The last ``maxlen`` calls, oldest first."""

    def __init__(self, maxlen: int) -> None:
        self._calls: deque[Call] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)

    def record(self, at: float, method: str, params: Mapping[str, str]) -> Call:
        """Log a call as it arrives; the caller fills in status, jobid and fault later."""
        kept = {
            k: v for k, v in params.items() if k != "command" and k.lower() not in UNLOGGED_PARAMS
        }
        call = Call(
            seq=next(self._seq),
            at=at,
            method=method,
            command=params.get("command"),
            params=kept,
            volume_id=params.get("id") or None,
        )
        self._calls.append(call)
        return call

    def __iter__(self) -> Iterator[Call]:
        return iter(list(self._calls))

    def __len__(self) -> int:
        return len(self._calls)

    def select(self, command: str | None = None, since: int = 0, **params: str) -> list[Call]:
        """The calls of ``command`` (None: any) with these parameter values, after seq ``since``."""
        return [c for c in self._calls if c.seq > since and c.matches(command, params)]

    def count(self, command: str | None = None, **params: str) -> int:
        """How many logged calls of ``command`` (None: any) had these parameter values."""
        return sum(1 for c in self._calls if c.matches(command, params))

    def mutations(self, volume_id: str | None = None) -> list[Call]:
        """The accepted calls that change a volume (``volume_id``; None: any), oldest first:
        what CloudStack was really asked to do to it. A detachVolume by VM and device id
        names no volume and is not among them."""
        return [
            c
            for c in self._calls
            if c.accepted
            and c.command in MUTATIONS
            and (volume_id is None or c.volume_id == volume_id)
        ]

    def clear(self) -> None:
        self._calls.clear()
