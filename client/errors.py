"""What the client raises: one root, ``ClientError``, and a subclass per outcome a caller
handles differently. Each mixes in the standard exception that fits, so that code which
knows nothing of volumed (``except TimeoutError``) still does the right thing."""

from __future__ import annotations

from schemas.events import OperationEvent


class ClientError(Exception):
    """Root of every error the volumed client raises."""


class Unavailable(ClientError, ConnectionError):
    """No NATS server could be reached, or volumed is not there to take the request (no
    stream captures commands, no service answers queries)."""


class Unauthorized(ClientError, PermissionError):
    """NATS refused this client: its user and password, creds file or client certificate
    (or TLS failed on the server's certificate), or a subject its user may not use.
    Trying again with the same settings does not help."""


class Timeout(ClientError, TimeoutError):
    """volumed did not answer, or an operation did not end, within the time allowed.

    For an operation this says nothing about its outcome: it may still complete."""


class NotFound(ClientError, LookupError):
    """A query named an operation, volume, device or VM that volumed does not know (404)."""


class BadRequest(ClientError, ValueError):
    """volumed refused a query as malformed (400), or the client refused to send a command
    whose operation id volumed could not use; the message says which field and why."""


class ServiceError(ClientError):
    """volumed failed to answer a query (its micro service's error other than 404 and 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} (error {code})")
        self.code = code
        self.message = message


class OperationFailed(ClientError):
    """An operation ended other than ``completed``: ``failed``, or a subclass below.

    ``code`` is the contract's error code (``not_found``, ``conflict``, ...); an operation
    cancelled by another one carries no error, and its code is then ``cancelled``.
    ``event`` is the terminal event itself."""

    def __init__(self, event: OperationEvent) -> None:
        self.event = event
        self.status = event.status
        if event.error is not None:
            self.code: str = event.error.code
            self.message = event.error.message
        else:
            self.code = event.status
            by = f" by operation {event.target}" if event.target else ""
            self.message = f"operation {event.operation_id} was {event.status}{by}"
        super().__init__(f"{self.code}: {self.message}")

    @property
    def operation_id(self) -> str:
        return self.event.operation_id

    @staticmethod
    def of(event: OperationEvent) -> OperationFailed:
        """The exception for a terminal event that is not ``completed``."""
        kind = {"rejected": OperationRejected, "cancelled": OperationCancelled}
        return kind.get(event.status, OperationFailed)(event)


class OperationRejected(OperationFailed):
    """The command was invalid (code ``invalid_request``); nothing was done for it."""


class OperationCancelled(OperationFailed):
    """The operation was cancelled before it started executing; nothing was done for it."""
