"""Injected failures: what goes wrong with the next calls, and how often."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

from msgspec import Meta, Struct
from msgspec.structs import replace

FaultKind = Literal["http", "job", "drop", "hang", "accept_then_drop", "accept_then_hang"]
"""
http: answer with HTTP ``status`` (a CloudStack error body, or a plain HTML page) and do nothing.
job: accept an async command, then fail its job (jobstatus 2, jobresultcode 530); nothing changes.
drop: close the connection without answering; nothing changes.
hang: answer nothing for ``seconds`` (None: until the simulator stops), then handle the call
    normally.
accept_then_drop: apply the call (the change happens, the job runs), then close the connection
    instead of answering.
accept_then_hang: apply the call, then answer only after ``seconds`` (a slow answer).
"""

JOB_ERRORTEXT = (
    "Job failed: com.cloud.utils.exception.CloudRuntimeException: org.libvirt.LibvirtException: "
    "internal error: simulated fault"
)
HTTP_ERRORTEXT = "Internal error executing command, please contact your system administrator"


class Fault(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One injected failure, consumed by the next ``count`` calls it matches."""

    kind: FaultKind
    command: str | None = None
    """The API command it hits (e.g. "attachVolume"); None: any command."""
    count: Annotated[int, Meta(ge=1)] = 1
    status: Annotated[int, Meta(ge=400, le=599)] = 530
    """http: the HTTP status (= errorcode of the JSON body)."""
    errortext: str | None = None
    """http and job: the error text; None: a realistic default (job: contains "internal error")."""
    json: bool | None = None
    """http: answer a CloudStack JSON error body; None: JSON for 4xx and 53x, HTML otherwise."""
    seconds: Annotated[float, Meta(ge=0)] | None = None
    """hang, accept_then_hang: how long to answer nothing; None: until the simulator stops
    (then the connection is closed without an answer)."""
    lasting: Annotated[float, Meta(gt=0)] | None = None
    """An outage: the fault hits every matching call for this many seconds after it is
    added (``count`` is then ignored), as a CloudStack management server that restarts."""

    def wants_json(self) -> bool:
        if self.json is not None:
            return self.json
        return self.status < 500 or 530 <= self.status <= 539

    def text(self) -> str:
        if self.errortext is not None:
            return self.errortext
        return JOB_ERRORTEXT if self.kind == "job" else HTTP_ERRORTEXT


@dataclass(slots=True)
class _Pending:
    fault: Fault
    left: int
    until: float | None = None  # time.monotonic() when an outage ends


class FaultBook:
    """Pending faults, oldest first; each call consumes at most one."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, fault: Fault) -> None:
        until = None if fault.lasting is None else time.monotonic() + fault.lasting
        self._pending.append(_Pending(fault, fault.count, until))

    def clear(self) -> None:
        self._pending.clear()

    def pending(self) -> list[Fault]:
        """The faults still to fire, each with its remaining count."""
        return [replace(p.fault, count=p.left) for p in self._pending]

    def refund(self, fault: Fault) -> None:
        """Give back one use of a fault taken by a call it did not affect."""
        for entry in self._pending:
            if entry.fault is fault:
                entry.left += 1
                return
        self._pending.insert(0, _Pending(fault, 1))

    def take(self, command: str | None, is_async: bool) -> Fault | None:
        """The fault this call triggers, if any; a job fault only fires on an async command."""
        now = time.monotonic()
        self._pending = [p for p in self._pending if p.until is None or p.until > now]
        for i, entry in enumerate(self._pending):
            fault = entry.fault
            if fault.command is not None and fault.command != command:
                continue
            if fault.kind == "job" and not is_async:
                continue
            if entry.until is not None:
                return fault  # an outage is not used up by the calls it hits
            entry.left -= 1
            if entry.left <= 0:
                del self._pending[i]
            return fault
        return None
