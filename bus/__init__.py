"""The message bus: the only package that imports ``nats``.

Actors see a ``Bus`` (publish, request, KV buckets), a ``Consumer`` that runs their handler
for each message and decides ack/nak/term from its outcome, the micro ``serve`` helper, and
the topology declared as data in ``bus.topology``.
"""

from bus.connection import Bus, encode
from bus.consumer import Consumer, Delivery
from bus.errors import (
    Abandon,
    BadRequest,
    BusError,
    Conflict,
    LeaseLost,
    NotFound,
    Refused,
    Reject,
    Retry,
    ServiceFailed,
    Unavailable,
)
from bus.kv import Bucket
from bus.service import ask, call, serve

__all__ = [
    "Abandon",
    "BadRequest",
    "Bucket",
    "Bus",
    "BusError",
    "Conflict",
    "Consumer",
    "Delivery",
    "LeaseLost",
    "NotFound",
    "Refused",
    "Reject",
    "Retry",
    "ServiceFailed",
    "Unavailable",
    "ask",
    "call",
    "encode",
    "serve",
]
