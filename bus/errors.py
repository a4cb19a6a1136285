"""What a message handler raises to tell the bus how its message ended.

The ack decision is made in one place (bus.consumer) from these: a handler that returns
normally has its message acknowledged; it never acks by hand.
"""

from __future__ import annotations


class BusError(Exception):
    """Root of the bus's own errors."""


class Conflict(BusError):
    """A create found the key present, or an update found it changed since it was read."""


class LeaseLost(BusError):
    """The lease expired or another process holds it now: stop, do nothing more."""


class Retry(BusError):
    """Transient failure: redeliver this message after ``delay`` seconds (nak with delay)."""

    def __init__(self, reason: str, delay: float = 1.0) -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(BusError):
    """Permanent failure: never redeliver (term); the message goes to the dead letters."""


class Abandon(BusError):
    """Leave the message unacknowledged: another delivery (after ack_wait) will take it.

    Used when this process cannot handle it now, e.g. it is already handling the same
    operation from an earlier delivery.
    """


class NotFound(BusError):
    """A query names something that does not exist (micro error 404)."""


class BadRequest(BusError):
    """A query is malformed (micro error 400)."""


class Unavailable(BusError):
    """Nobody is there to take a message: no stream captures its subject, or no service
    answers it (volumed is not running, or not provisioned on this server)."""


class ServiceFailed(BusError):
    """A micro service answered with an error other than 404 or 400 (its code, its text)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{text} (error {code})")
        self.code = code
        self.text = text


class Refused(BusError, PermissionError):
    """NATS refused this connection, or TLS failed: the user, password or creds file, the
    client certificate, or the server's certificate. Waiting does not fix it."""
