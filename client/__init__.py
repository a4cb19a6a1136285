"""The typed asyncio client of volumed, and the `volumed` user commands built on it.

It sits beside the actors (schemas <- bus <- client) and never imports them: other Python
code (the migration appliance) imports ``client`` to drive volumed through NATS.
"""

from client.client import DEFAULT_SERVER, Client, Events, Progress, new_operation_id
from client.errors import (
    BadRequest,
    ClientError,
    NotFound,
    OperationCancelled,
    OperationFailed,
    OperationRejected,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "DEFAULT_SERVER",
    "BadRequest",
    "Client",
    "ClientError",
    "Events",
    "NotFound",
    "OperationCancelled",
    "OperationFailed",
    "OperationRejected",
    "Progress",
    "ServiceError",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "new_operation_id",
]
