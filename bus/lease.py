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

from bus.errors import Conflict
from bus.errors import LeaseLost as LeaseLost  # defined with the other bus errors
from bus.kv import Bucket
from bus.tasks import Backoff
from schemas.internal import LeaseHolder

log = logging.getLogger("volumed.bus.lease")

VALID_SHARE = 0.6
"""Of the ttl: how long after its last renewal was sent a holder still counts on it."""
RENEWALS_PER_TTL = 5
"""Renewals within one ttl: a lease stays valid through two renewals in a row failing."""
_MAX_POLL = 0.25  # seconds between two tries of a held lease


def now() -> float:
    """This host's clock for leases: CLOCK_BOOTTIME (it runs while the host is suspended)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


_now = now


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
        # Released while the server could not be told: key -> (lease, give up after).
        self._releasing: dict[str, tuple[Lease, float]] = {}
        self._now = asyncio.Event()

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

    async def release(self, lease: Lease, *, confirmed: bool = True) -> None:
        """Give the lease up now (else it expires by itself one ttl after its renewal).

        Compare-and-set on its revision (or, after a renewal whose answer was lost, its
        token), so a lease that lapsed meanwhile is released too if the key is still this
        one, and never when another process holds the key. A release that a blip kept from
        the server is tried again by ``run`` (at once after a reconnect): the next holder
        need not wait for the key to expire.

        ``confirmed=False``: one delete on the revision, its answer not waited for (one bus
        message instead of two) and never tried again: for a lease that nobody is expected
        to want soon (an operation that has ended). If that delete is lost, or a renewal's
        answer was lost (another revision), the key just expires one ttl later; it is never
        another holder's key that goes (compare-and-set on this lease's revision)."""
        if self._held.get(lease.key) is lease:
            del self._held[lease.key]
        if lease.lost:
            return  # perhaps another's by now: never delete that
        if not confirmed:
            with contextlib.suppress(Exception):  # (it expires by itself)
                await self._bucket.delete_unconfirmed(lease.key, lease.revision)
            return
        if not await self._delete(lease):
            self._releasing[lease.key] = (lease, _now() + 2 * self.ttl)

    async def _delete(self, lease: Lease) -> bool:
        """Delete the key if it is still ``lease``'s; False when the server did not say."""
        try:
            await self._bucket.delete(lease.key, revision=lease.revision)
        except Conflict:
            # A renewal landed meanwhile: still ours if the token is, one revision on.
            try:
                got = await self._bucket.get(lease.key)
                if got is not None and got[0].token == lease.token:
                    await self._bucket.delete(lease.key, revision=got[1])
            except Conflict:
                return True  # moved on again: another's now
            except Exception as e:
                log.debug("lease %s not released yet (%s)", lease.key, e)
                return False
        except Exception as e:
            log.debug("lease %s not released yet (%s)", lease.key, e)
            return False
        return True

    def renew_now(self) -> None:
        """Renew (and finish releasing) at once, not at the next round: called after a NATS
        reconnect, when renewals may have failed during the cut (synchronous, for
        ``Bus.on_reconnect``)."""
        self._now.set()

    async def run(self) -> None:
        """Renew every held lease, ``RENEWALS_PER_TTL`` times per ttl (and at once when
        ``renew_now`` is called)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self.ttl / RENEWALS_PER_TTL)
            self._now.clear()
            await asyncio.gather(
                *(self._renew_within(lease) for lease in list(self._held.values())),
                *(self._release_again(key) for key in list(self._releasing)),
            )

    async def _release_again(self, key: str) -> None:
        lease, until = self._releasing[key]
        # (Past ``until`` the server has long expired it, whatever was lost.)
        done = _now() > until
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.ttl / RENEWALS_PER_TTL):  # never delays a renewal
                done = done or await self._delete(lease)
        if done and self._releasing.get(key, (None,))[0] is lease:
            del self._releasing[key]

    async def _renew_within(self, lease: Lease) -> None:
        """One renewal, given up before the next is due: a slow one never delays the
        others past their validity."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.ttl / RENEWALS_PER_TTL):
                await self._renew(lease)

    async def _renew(self, lease: Lease) -> None:
        if lease.lost or self._held.get(lease.key) is not lease:
            return  # (released meanwhile: a renewal now would keep the key from the next)
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
