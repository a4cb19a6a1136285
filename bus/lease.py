"""Leases in a KV bucket: one holder at a time for a key, across processes and hosts.

A lease is a key of a bucket whose entries expire ``ttl`` seconds after their last write
(the server's max_age, on the server's clock). Acquiring creates the key (KV create: one
winner); the holder renews it compare-and-set on the revision it wrote last, so a holder
that lost it learns so at its next renewal; a dead holder's key expires on the server, and
only then can another process create it: takeover happens after expiry, never before.

No two clocks are compared. The holder counts its lease valid for ``VALID_SHARE`` of the
ttl after it *sent* its last successful write, on its own clock (CLOCK_BOOTTIME, which also
runs while the host is suspended); the server stored that write later, so the key outlives
the holder's belief by at least the rest of the ttl (the server's clock must not step by
that much: with replicated buckets, keep the cluster's clocks in sync). Work that must not
run twice (a CloudStack mutation) calls ``Lease.check()`` just before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from bus.kv import Bucket, Conflict
from bus.tasks import Backoff
from schemas.internal import LeaseHolder

log = logging.getLogger("volumed.bus.lease")

VALID_SHARE = 0.6
"""Of the ttl: how long after its last renewal was sent a holder still counts on it."""
RENEWALS_PER_TTL = 5
"""Renewals within one ttl: a lease stays valid through two renewals in a row failing."""
_MAX_POLL = 0.25  # seconds between two tries of a held lease


def _now() -> float:
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


class LeaseLost(Exception):
    """The lease expired or another process holds it now: stop, do nothing more."""


class Lease:
    """One held lease (see the module doc). ``valid`` is this process's belief."""

    def __init__(self, key: str, token: str, revision: int, sent: float, ttl: float) -> None:
        self.key = key
        self.token = token
        self.revision = revision
        self.ttl = ttl
        self._valid_until = sent + ttl * VALID_SHARE
        self.lost = False

    def renewed(self, revision: int, sent: float) -> None:
        self.revision = revision
        self._valid_until = sent + self.ttl * VALID_SHARE

    @property
    def valid(self) -> bool:
        return not self.lost and _now() < self._valid_until

    def check(self) -> None:
        if not self.valid:
            raise LeaseLost(f"the lease {self.key} is no longer held")


class Leases:
    """Every lease of one process in one bucket, renewed by one loop (``run``)."""

    def __init__(self, bucket: Bucket[LeaseHolder], holder: str, ttl: float) -> None:
        self._bucket = bucket
        self.holder = holder
        self.ttl = ttl
        self._held: dict[str, Lease] = {}

    def held(self, key: str) -> Lease | None:
        return self._held.get(key)

    async def try_acquire(self, key: str) -> Lease | None:
        """The lease if nobody holds it now, else None."""
        token = uuid.uuid4().hex
        sent = _now()
        try:
            revision = await self._bucket.create(key, self._value(token))
        except Conflict:
            return None
        lease = self._held[key] = Lease(key, token, revision, sent, self.ttl)
        return lease

    async def acquire(self, key: str, *, timeout: float | None = None) -> Lease:
        """Wait until the lease is free (released, or expired on the server), then take it;
        TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else _now() + timeout
        backoff = Backoff(0.01, _MAX_POLL)
        while (lease := await self.try_acquire(key)) is None:
            if deadline is not None and _now() + backoff.delay > deadline:
                raise TimeoutError(f"the lease {key} is held elsewhere")
            await backoff.pause()
        return lease

    @contextlib.asynccontextmanager
    async def holding(self, key: str, *, timeout: float | None = None) -> AsyncIterator[Lease]:
        lease = await self.acquire(key, timeout=timeout)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def release(self, lease: Lease) -> None:
        """Give the lease up now (else it expires by itself one ttl after its renewal)."""
        if self._held.get(lease.key) is lease:
            del self._held[lease.key]
        if not lease.valid:
            return  # perhaps another's by now: never delete that
        try:
            await self._bucket.delete(lease.key, revision=lease.revision)
        except Conflict:
            # A renewal landed meanwhile: still ours if the token is, one revision on.
            got = await _quietly_get(self._bucket, lease.key)
            if got is not None and got[0].token == lease.token:
                with contextlib.suppress(Exception):
                    await self._bucket.delete(lease.key, revision=got[1])
        except Exception as e:
            log.debug("lease %s not released (%s); it expires by itself", lease.key, e)

    async def run(self) -> None:
        """Renew every held lease, ``RENEWALS_PER_TTL`` times per ttl."""
        while True:
            await asyncio.sleep(self.ttl / RENEWALS_PER_TTL)
            await asyncio.gather(
                *(self._renew_within(lease) for lease in list(self._held.values()))
            )

    async def _renew_within(self, lease: Lease) -> None:
        """One renewal, given up before the next is due: a slow one never delays the
        others past their validity."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.ttl / RENEWALS_PER_TTL):
                await self._renew(lease)

    async def _renew(self, lease: Lease) -> None:
        if lease.lost:
            return
        sent = _now()
        try:
            revision = await self._bucket.update(
                lease.key, self._value(lease.token), lease.revision
            )
        except Conflict:
            # Our earlier renewal may have been stored with its answer lost: then the key is
            # still ours, one revision on. Anything else: another holds it now.
            # (Its send time is unknown: renew again now rather than count on it.)
            got = await _quietly_get(self._bucket, lease.key)
            if got is not None and got[0].token == lease.token and got[1] != lease.revision:
                lease.revision = got[1]
                await self._renew(lease)
                return
            lease.lost = True
            log.warning("lease %s was lost (expired, and taken or released)", lease.key)
        except Exception as e:
            log.debug("lease %s not renewed (%s); it stays valid for a while", lease.key, e)
        else:
            if self._held.get(lease.key) is lease:
                lease.renewed(revision, sent)

    def _value(self, token: str) -> LeaseHolder:
        return LeaseHolder(holder=self.holder, token=token, at=time.time())


async def _quietly_get(bucket: Bucket[LeaseHolder], key: str) -> tuple[LeaseHolder, int] | None:
    try:
        return await bucket.get(key)
    except Exception:
        return None
