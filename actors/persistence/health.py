"""The health answer: real checks of NATS and the database, and the other actors' own
checks read from their heartbeats in the health bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from actors.logs import SECRETS
from actors.persistence.gate import WriteGate
from actors.persistence.store import Store
from bus import Bucket, Bus
from bus.topology import HEALTH_BUCKET
from schemas.internal import Heartbeat
from schemas.queries import Check, Health, HealthStatus

log = logging.getLogger("volumed.persistence.health")

STALE_AFTER = 15.0  # seconds: heartbeats come every few seconds
CHECK_TIMEOUT = 3.0

# Checks that must be present, and the actor whose heartbeat carries each.
REQUIRED: dict[str, str] = {
    "cloudstack": "executor",
    "device_watcher": "watcher",
    "correlator": "correlator",
}
# Checks this process makes itself: an overall "down" when either fails.
OWN = ("nats", "database")

_OK = {"ok", "healthy", "up"}
_DOWN = {"down", "failed", "error", "unavailable"}


def _normalize(status: str) -> HealthStatus:
    s = status.lower()
    return "ok" if s in _OK else "down" if s in _DOWN else "degraded"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class HealthChecker:
    def __init__(
        self,
        bus: Bus,
        store: Callable[[], Store | None],
        store_error: Callable[[], str],
        *,
        stale_after: float = STALE_AFTER,
        gate: WriteGate | None = None,
    ) -> None:
        self.bus = bus
        self._store = store
        self._store_error = store_error
        self._gate = gate
        self.stale_after = stale_after
        self._bucket: Bucket[Heartbeat] | None = None

    async def check(self) -> Health:
        nats, database, beats = await asyncio.gather(
            self._nats(), self._database(), self._heartbeats()
        )
        checks = {"nats": nats, "database": database, **beats}
        # The safety net: details quote other actors' and libraries' error texts, which
        # must not carry a secret (a password in a CloudStack endpoint, say) into the reply.
        for check in checks.values():
            check.detail = SECRETS.mask(check.detail)
        if any(checks[name].status == "down" for name in OWN):
            overall: HealthStatus = "down"
        elif any(c.status != "ok" for c in checks.values()):
            overall = "degraded"
        else:
            overall = "ok"
        return Health(status=overall, checks=checks)

    async def _nats(self) -> Check:
        if not self.bus.connected:
            return Check(
                status="down", detail=f"not connected to NATS {self.bus.last_error}".strip()
            )
        try:
            rtt = await asyncio.wait_for(self.bus.ping(), CHECK_TIMEOUT)
        except Exception as e:
            return Check(
                status="down", detail=f"JetStream does not answer: {e or type(e).__name__}"
            )
        refusal = self.bus.store_refusal
        if refusal is not None:
            # Publishes wait and are tried again (nothing is lost), but nothing new is
            # stored until the stream or account has room again.
            return Check(
                status="degraded",
                detail=f"JetStream refuses to store messages for {refusal.age():.0f} s: "
                f"{refusal.cause}",
            )
        return Check(status="ok", detail=f"JetStream round trip {_ms(rtt)}")

    async def _database(self) -> Check:
        store = self._store()
        if store is None:
            return Check(status="down", detail=f"not connected: {self._store_error()}")
        try:
            latency = await asyncio.wait_for(store.ping(), CHECK_TIMEOUT)
        except TimeoutError:
            return Check(status="down", detail=f"{store.where}: no answer within {CHECK_TIMEOUT} s")
        except Exception as e:
            return Check(status="down", detail=str(e) or type(e).__name__)
        gate = self._gate
        if gate is not None and gate.cause is not None:
            # Reads work, writes do not (privileges, read-only, a table of another shape):
            # queries answer from rows that stopped following the events.
            return Check(
                status="degraded",
                detail=f"writes refused for {time.monotonic() - (gate.since or 0):.0f} s, "
                f"events wait in the stream: {gate.cause}",
            )
        return Check(status="ok", detail=f"query in {_ms(latency)} ({store.where})")

    async def _heartbeats(self) -> dict[str, Check]:
        try:
            beats = await asyncio.wait_for(self._read_heartbeats(), CHECK_TIMEOUT)
        except Exception as e:
            self._bucket = None
            reason = f"cannot read heartbeats from the health bucket: {e or type(e).__name__}"
            return {name: Check(status="down", detail=reason) for name in REQUIRED}
        return self._evaluate(beats, time.time())

    async def _read_heartbeats(self) -> list[Heartbeat]:
        if self._bucket is None:
            self._bucket = await self.bus.bucket(HEALTH_BUCKET, Heartbeat)
        out = []
        for key in await self._bucket.keys():
            with contextlib.suppress(Exception):  # gone meanwhile, or not a heartbeat
                got = await self._bucket.get(key)
                if got is not None:
                    out.append(got[0])
        return out

    def _evaluate(self, beats: list[Heartbeat], now: float) -> dict[str, Check]:
        fresh = [b for b in beats if now - b.at <= self.stale_after]
        names = list(REQUIRED)
        names += sorted({n for b in fresh for n in b.checks if n not in REQUIRED and n not in OWN})
        out: dict[str, Check] = {}
        for name in names:
            actor = REQUIRED.get(name)
            reporting = [b for b in fresh if name in b.checks or (actor and b.actor == actor)]
            if not reporting:
                out[name] = self._missing(name, actor, beats, now)
                continue
            statuses: list[HealthStatus] = []
            details = []
            for b in sorted(reporting, key=lambda b: b.instance):
                result = b.checks.get(name)
                if result is None:
                    statuses.append("degraded")
                    details.append(f"{b.instance}: its heartbeat has no {name} check")
                else:
                    statuses.append(_normalize(str(result.status)))
                    details.append(f"{b.instance}: {result.status} {result.detail}".strip())
            if all(s == "ok" for s in statuses):
                status: HealthStatus = "ok"
            elif all(s == "down" for s in statuses):
                status = "down"
            else:
                status = "degraded"
            out[name] = Check(status=status, detail="; ".join(details))
        return out

    def _missing(self, name: str, actor: str | None, beats: list[Heartbeat], now: float) -> Check:
        stale = [b for b in beats if name in b.checks or (actor and b.actor == actor)]
        who = actor or "actor"
        if stale:
            newest = max(stale, key=lambda b: b.at)
            return Check(
                status="down",
                detail=f"the newest {who} heartbeat ({newest.instance}) is "
                f"{now - newest.at:.0f} s old (stale after {self.stale_after:.0f} s)",
            )
        return Check(
            status="down",
            detail=f"no {who} heartbeat in the health bucket: is a volumed {who} running?",
        )
