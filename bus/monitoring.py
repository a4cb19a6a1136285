"""What the server knows about volumed's streams and consumers, read for the metrics.

Read-only and cheap: one consumer-list request per stream and one stream-info request for
the dead letters. The numbers are the server's, so every process reads the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.errors import NotFoundError

from bus.connection import Bus
from bus.topology import DEAD_LETTER_PREFIX, DEAD_LETTERS, Topology


@dataclass(frozen=True)
class ConsumerLag:
    stream: str
    consumer: str
    pending: int
    """Messages of the stream the consumer has not been given yet."""
    ack_pending: int
    """Messages given to a subscriber and not acknowledged yet (in flight)."""
    redelivered: int
    """Messages in flight that were given more than once (ack wait ran out, or a nak)."""


@dataclass(frozen=True)
class DeadLetterCount:
    stream: str
    consumer: str
    messages: int


async def consumer_lag(bus: Bus, topology: Topology) -> list[ConsumerLag]:
    """Every durable consumer of the topology's streams, as the server lists them (the
    correlators' per-VM consumers included)."""
    out = []
    for spec in topology.streams:
        try:
            infos = await bus.js.consumers_info(spec.name)
        except NotFoundError:
            continue  # not provisioned yet
        for info in infos:
            out.append(
                ConsumerLag(
                    stream=spec.name,
                    consumer=info.name,
                    pending=info.num_pending or 0,
                    ack_pending=info.num_ack_pending or 0,
                    redelivered=info.num_redelivered or 0,
                )
            )
    return out


async def dead_letters(bus: Bus) -> list[DeadLetterCount]:
    """Messages held in the dead-letter stream, by the stream and consumer that gave up
    on them (subjects ``volumed.dead.<stream>.<consumer>``)."""
    prefix = f"{DEAD_LETTER_PREFIX}."
    try:
        info = await bus.js.stream_info(DEAD_LETTERS.name, subjects_filter=f"{prefix}>")
    except NotFoundError:
        return []
    out = []
    for subject, count in sorted((info.state.subjects or {}).items()):
        stream, _, consumer = subject.removeprefix(prefix).partition(".")
        out.append(DeadLetterCount(stream=stream, consumer=consumer, messages=count))
    return out
