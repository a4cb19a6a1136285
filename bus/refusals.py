"""JetStream refusing to store messages for want of room: noted where publishes and KV
writes fail, cleared where they succeed again, read by the health checks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nats.js.errors import APIError

log = logging.getLogger("volumed.bus")

# JetStream's error codes for "no room": insufficient resources, account resources exceeded,
# insufficient storage or memory, and the store failing a message (maximum bytes or
# messages exceeded with discard new, a write error).
_NO_ROOM = {10002, 10023, 10028, 10047, 10077}


@dataclass(frozen=True)
class StoreRefusal:
    """JetStream answered a write with a refusal to store it (a stream or account at its
    limits, a full disk): the writer tries again later, health names the cause."""

    cause: str
    since: float  # time.monotonic() of the first refused write

    def age(self) -> float:
        return time.monotonic() - self.since


class StoreRefusals:
    """The refusals in force, one per place written to (a stream's subjects, a bucket): a
    write that succeeds clears its own place only, so a full stream is not hidden by a
    bucket that still has room."""

    def __init__(self) -> None:
        self._by_place: dict[str, StoreRefusal] = {}

    def refused(self, place: str, what: str, e: Exception) -> None:
        """Note ``e`` if it is a refusal for want of room (anything else is not noted)."""
        if not isinstance(e, APIError) or (e.code != 503 and e.err_code not in _NO_ROOM):
            return
        cause = f"{e.description or type(e).__name__} (error {e.err_code}) storing {what}"
        earlier = self._by_place.get(place)
        if earlier is None:
            log.warning("JetStream refuses to store messages: %s", cause)
        since = earlier.since if earlier is not None else time.monotonic()
        self._by_place[place] = StoreRefusal(cause, since)

    def stored(self, place: str) -> None:
        earlier = self._by_place.pop(place, None)
        if earlier is not None:
            log.info("JetStream stores messages again (%s)", earlier.cause)

    def current(self) -> StoreRefusal | None:
        """All refusals in force as one (the oldest's age), or None."""
        if not self._by_place:
            return None
        refusals = sorted(self._by_place.values(), key=lambda r: r.since)
        return StoreRefusal("; ".join(r.cause for r in refusals), refusals[0].since)
