"""Every subject, query, stream, consumer and KV bucket volumed uses, declared once as data.

Provisioning (bus.connection.Bus.provision) creates what is missing and updates what exists
(stream settings, consumer ack settings, bucket retention); nothing else in the code base
names a stream or a durable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from msgspec import Struct

from schemas.common import OP_TYPES, OpType
from schemas.config import Settings
from schemas.queries import (
    Health,
    HealthQuery,
    Mapping,
    MappingQuery,
    Operation,
    OperationQuery,
    Operations,
    OperationsQuery,
    VmVolumes,
    VmVolumesQuery,
)

# Public subjects (contract §2-§4).
COMMAND_PREFIX = "volume.cmd"
COMMAND_TYPES: tuple[OpType, ...] = OP_TYPES  # one subject per operation type
EVENTS_PREFIX = "volume.events"
API_PREFIX = "volume.api"  # volume.api.<query>: the queries (QuerySpec, API_QUERIES below)

# Internal subjects: "volumed." so that they never collide with the public "volume." space.
DEVICE_PREFIX = "volumed.device"  # volumed.device.<vm_id>
# executor → correlator of a VM: volumed.correlate.<vm_id>.attach (CorrelateRequest) and
# .detach (ReleaseRequest); correlator → executor: volumed.correlated.<operation_id>.attach
# (CorrelateResult) and .detach (ReleaseResult). Both in the CORRELATION stream, so either
# side can pick up where it was after a restart.
CORRELATE_PREFIX = "volumed.correlate"
CORRELATED_PREFIX = "volumed.correlated"
# correlator → persistence: volumed.proof.<vm_id> (MappingProof), every mapped volume of the
# VM proven again against the devices present now.
PROOF_PREFIX = "volumed.proof"
CONFIG_SUBJECT = "volumed.internal.cloudstack_config"
# executor → persistence (core request): the other creates that may have made a volume not
# claimed yet (schemas.internal.CreatesQuery → CreatesInDoubt), asked only by a create whose
# answer was lost; from the database, once it holds every event published before the query.
CREATES_SUBJECT = "volumed.internal.creates_in_doubt"
# anyone → every correlator (core request, no stream): prove your VM's mappings again now;
# each answers {"vm_id", "correlator"}. The REST gateway's POST /api/v1/admin/force-sync.
REPROVE_SUBJECT = "volumed.internal.reprove"
DEAD_LETTER_PREFIX = "volumed.dead"  # .<stream>.<consumer>


def command_subject(op_type: str) -> str:
    return f"{COMMAND_PREFIX}.{op_type}"


def api_subject(query: str) -> str:
    return f"{API_PREFIX}.{query}"


def event_subject(operation_id: str) -> str:
    return f"{EVENTS_PREFIX}.{operation_id}"


def device_subject(vm_id: str) -> str:
    return f"{DEVICE_PREFIX}.{vm_id}"


def proof_subject(vm_id: str) -> str:
    return f"{PROOF_PREFIX}.{vm_id}"


def correlate_request_subject(vm_id: str) -> str:
    return f"{CORRELATE_PREFIX}.{vm_id}.attach"


def release_request_subject(vm_id: str) -> str:
    return f"{CORRELATE_PREFIX}.{vm_id}.detach"


def correlate_result_subject(operation_id: str) -> str:
    return f"{CORRELATED_PREFIX}.{operation_id}.attach"


def release_result_subject(operation_id: str) -> str:
    return f"{CORRELATED_PREFIX}.{operation_id}.detach"


Req = TypeVar("Req", bound=Struct)
Rep = TypeVar("Rep", bound=Struct)


@dataclass(frozen=True)
class QuerySpec(Generic[Req, Rep]):
    """One query of the ``volumed`` micro service (contract §4): its endpoint name, its
    request and reply types. The one table of the queries (API_QUERIES): persistence serves
    each (actors.persistence.api.Api, which refuses to start with one unserved or one
    undeclared), asking is typed by it (bus.service.ask, client.Client.ask), and
    actors.apidocs documents it."""

    name: str
    request: type[Req]
    reply: type[Rep]
    summary: str
    # The micro service error codes it answers with besides its reply (the meanings:
    # actors.apidocs.SERVICE_ERRORS); 404 only where an id can be unknown.
    errors: tuple[str, ...] = ("400", "500")
    # Whether an empty request body stands for {} (else it is a 400): for the queries whose
    # every field is optional.
    empty_body: bool = False

    @property
    def subject(self) -> str:
        return api_subject(self.name)


# The queries, in the contract's order (§4).
API_OPERATION = QuerySpec(
    "operation", OperationQuery, Operation, "one operation", errors=("400", "404", "500")
)
API_OPERATIONS = QuerySpec(
    "operations",
    OperationsQuery,
    Operations,
    "the operations matching every filter given, newest first",
    empty_body=True,
)
API_MAPPING = QuerySpec(
    "mapping",
    MappingQuery,
    Mapping,
    "the device mapping of a volume, or of a device path (with vm_id when several VMs "
    "have one there)",
    errors=("400", "404", "500"),
)
API_VM_VOLUMES = QuerySpec("vm_volumes", VmVolumesQuery, VmVolumes, "the volumes of a VM")
# Health takes no parameters: any JSON, or nothing, is its request.
API_HEALTH = QuerySpec(
    "health", HealthQuery, Health, "volumed's health and its checks", empty_body=True
)
API_QUERIES: tuple[QuerySpec[Any, Any], ...] = (
    API_OPERATION,
    API_OPERATIONS,
    API_MAPPING,
    API_VM_VOLUMES,
    API_HEALTH,
)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age: float = 0.0  # seconds; 0 = forever
    # Seconds of JetStream's own Nats-Msg-Id dedupe; 0 = the server default (2 min).
    duplicate_window: float = 0.0
    storage: Literal["file", "memory"] = "file"
    max_msgs_per_subject: int = -1
    description: str = ""


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None = None
    ack_wait: float = 30.0
    max_deliver: int = -1
    # Client side: after this many deliveries the consumer gives a message up itself (it
    # ends the handler's work first, then dead-letters and terminates it); -1: never. Used
    # instead of the server's max_deliver where the ack floor must pass a message only once
    # its work has ended: the server drops a message that ran out of deliveries from its
    # pending set at once, and the floor then moves past it.
    give_up_after: int = -1
    # Server side: BackOff[n] replaces ack_wait as the ack wait of delivery n+1 (nats-notes),
    # which also bounds how often a running handler must heartbeat. Usually left empty.
    backoff: tuple[float, ...] = ()
    # Client side: the nak delay after failed delivery n (the last one repeats); empty: the
    # backoff, else 2**n seconds, at most 60.
    nak_delays: tuple[float, ...] = ()
    max_ack_pending: int = 20_000
    description: str = ""

    def ack_wait_of(self, num_delivered: int) -> float:
        """The ack wait the server applies to delivery ``num_delivered`` (1, 2, ...)."""
        if self.backoff:
            return self.backoff[min(num_delivered, len(self.backoff)) - 1]
        return self.ack_wait

    def nak_delay(self, num_delivered: int) -> float:
        delays = self.nak_delays or self.backoff
        if delays:
            return delays[min(num_delivered, len(delays)) - 1]
        return min(2.0**num_delivered, 60.0)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int = 1
    ttl: float = 0.0  # seconds; 0 = forever
    description: str = ""


@dataclass(frozen=True)
class Topology:
    streams: tuple[StreamSpec, ...] = field(default_factory=tuple)
    consumers: tuple[ConsumerSpec, ...] = field(default_factory=tuple)
    buckets: tuple[BucketSpec, ...] = field(default_factory=tuple)


DAY = 86_400.0

COMMANDS = StreamSpec(
    name="VOLUMED_COMMANDS",
    subjects=tuple(command_subject(t) for t in COMMAND_TYPES),
    max_age=7 * DAY,
    # Idempotency is volumed's own, durable, by operation id (the operations bucket), and a
    # re-sent command must reach the executor so that it can publish the latest event again.
    # JetStream's dedupe would swallow it silently, so its window is kept minimal.
    duplicate_window=0.1,  # the least the server accepts
    description="volume commands as users published them",
)
EVENTS = StreamSpec(
    name="VOLUMED_EVENTS",
    subjects=(f"{EVENTS_PREFIX}.>",),
    max_age=30 * DAY,
    description="every operation's progress, volume.events.<operation_id>",
)
DEVICES = StreamSpec(
    name="VOLUMED_DEVICES",
    subjects=(f"{DEVICE_PREFIX}.>",),
    max_age=DAY,
    description="block devices appearing and disappearing, per VM",
)
CORRELATION = StreamSpec(
    name="VOLUMED_CORRELATION",
    subjects=(f"{CORRELATE_PREFIX}.>", f"{CORRELATED_PREFIX}.>"),
    max_age=DAY,
    description="attach/detach hand-offs between executor and correlator",
)
MAPPING_PROOFS = StreamSpec(
    name="VOLUMED_MAPPING_PROOFS",
    subjects=(f"{PROOF_PREFIX}.>",),
    max_age=DAY,
    # Each proof covers every mapping of its VM and supersedes the earlier ones: only the
    # newest per VM is worth applying (persistence also ignores one older than the rows).
    max_msgs_per_subject=1,
    description="each VM's device mappings proven again against its present devices",
)
DEAD_LETTERS = StreamSpec(
    name="VOLUMED_DEAD_LETTERS",
    subjects=(f"{DEAD_LETTER_PREFIX}.>",),
    max_age=30 * DAY,
    description="messages that could not be processed, with the reason",
)

EXECUTOR = ConsumerSpec(
    stream=COMMANDS.name,
    durable="executor",
    # Heartbeats (in_progress, every ack_wait/5) keep a long CloudStack job's message; a
    # silent executor has died and its commands go to another after this: the takeover time
    # after a kill -9. No server-side backoff: it would replace this ack wait (1 s made
    # every running command redeliver at 1, 3 and 8 s, spending max_deliver).
    ack_wait=10.0,
    # Bounded, by the consumer itself: a command that keeps failing (or whose process keeps
    # dying) ends failed and is dead-lettered, never redelivered forever; the server never
    # drops it first (the per-volume order reads the ack floor).
    max_deliver=-1,
    give_up_after=8,
    nak_delays=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
    description="executors share the command stream",
)
# A command is given up one way: by the executor's consumer (give_up_after, its on_give_up
# ends the operation). Retired: the stream VOLUMED_GIVEN_UP and its consumer
# executor_given_up kept the server's MAX_DELIVERIES advisories, dead since max_deliver is -1.
# Provisioning does not delete them where an older volumed made them: the role users that
# provision at start may not delete streams (only admin may), a process of the older volumed
# still running in a rolling upgrade would lose its consumer, and an advisory still in it
# would be dropped unhandled. Nothing is captured in it any more (no max_deliver, no
# advisory) and what it holds ages out (30 days); docs/operations.md says how to remove it.
PERSISTENCE = ConsumerSpec(
    stream=EVENTS.name,
    durable="persistence",
    # Handlers heartbeat (bus/consumer.py), so this is only how long the events a killed
    # persistence process had taken wait for another: queries wait for them (READ_AFTER).
    ack_wait=10.0,
    # Unbounded: a database outage must delay events, never drop them. Undecodable events
    # are terminated and dead-lettered by the handler instead.
    max_deliver=-1,
    description="the database writers share the event stream",
)

PERSISTENCE_PROOFS = ConsumerSpec(
    stream=MAPPING_PROOFS.name,
    durable="persistence_proofs",
    ack_wait=10.0,
    # Unbounded like the events: a database outage delays a proof, never drops it.
    max_deliver=-1,
    description="the database writers apply the correlators' mapping proofs",
)

# The consumers whose writes a query must see (contract §4: a query made after an event was
# received reflects at least that event). Each acks a message only after its effect is
# committed, so a query waits until each one's ack floor has reached the last sequence its
# stream had when the query arrived.
READ_AFTER: tuple[ConsumerSpec, ...] = (PERSISTENCE, PERSISTENCE_PROOFS)


def correlator_consumer(vm_id: str) -> ConsumerSpec:
    """The correlator of one VM takes the attach and detach hand-offs for that VM only."""
    return ConsumerSpec(
        stream=CORRELATION.name,
        durable=f"correlator_{vm_id}".replace(".", "_"),
        filter_subject=f"{CORRELATE_PREFIX}.{vm_id}.*",
        ack_wait=30.0,
        max_deliver=8,
        backoff=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        description=f"device correlation for VM {vm_id}",
    )


OPERATIONS_BUCKET = BucketSpec(
    name="volumed_operations",
    history=1,
    # A record expires this long after its last change (VOLUMED_OPERATION_RETENTION; the
    # database keeps the history): the horizon of idempotency by operation id.
    ttl=30 * DAY,
    description="operation records: the idempotency claim and what a restart resumes from",
)
HEALTH_BUCKET = BucketSpec(
    name="volumed_health",
    history=1,
    ttl=120.0,
    description="each actor's latest heartbeat and own checks",
)

# The attaches that may be running in CloudStack now, one key per operation id: written by
# the executor before an attach turns ``executing`` and deleted once its record is terminal.
# The correlator lists this small bucket (never the whole operations bucket, which only
# grows) to know which attaches could own a device that appears.
ATTACHING_BUCKET = BucketSpec(
    name="volumed_attaching",
    history=1,
    # Ended attaches leave a delete marker: a day (far beyond any attach: job timeout plus
    # correlation timeout) keeps the listing small.
    ttl=DAY,
    description="attaches in flight (schemas.internal.AttachInFlight), key: operation id",
)

# Which operation a volume belongs to, one key per volume id (schemas.internal.VolumeOwner):
# a create claims the volume it made (KV create: exactly one claim wins) as soon as
# createVolume names it, and a create whose answer was lost may adopt a volume found by
# name only by winning this claim, so no create ever ends with another one's volume.
# A claim only matters to a look-up of a create sent around the volume's creation time, and
# no create is resumed after its command has aged out of the command stream: claims expire
# a day after that.
VOLUME_OWNERS_BUCKET = BucketSpec(
    name="volumed_volume_owners",
    history=1,
    ttl=COMMANDS.max_age + DAY,
    description="the create operation each volume belongs to (key: volume id)",
)

# Leases (bus.lease): "gate.<vm id>" is held by the one attach to that VM allowed to run
# while its host has not shown device serials. A key expires this long after its holder's
# last renewal. (An operation's own lease is its record: actors/executor/run.py.)
LEASES_BUCKET = BucketSpec(
    name="volumed_leases",
    history=1,
    ttl=EXECUTOR.ack_wait,
    description="each host's serial-less attach gate",
)

# Hosts (VM ids) whose devices have shown serials: an attach to such a VM was proven by its
# device's serial, in whichever executor process ran it. Until then attaches to the VM start
# one at a time (its gate lease, above); a proof by exclusion since removes the key. Kept
# per host, not per process: a process that never ran an attach to it knows too.
SERIALS_BUCKET = BucketSpec(
    name="volumed_serials",
    history=1,
    description="VMs whose devices carry serials (key: vm id)",
)

DEVICES_BUCKET = BucketSpec(
    name="volumed_devices",
    history=1,
    description="each VM's block devices as its watcher last saw them (key: vm id)",
)

TOPOLOGY = Topology(
    streams=(COMMANDS, EVENTS, DEVICES, CORRELATION, MAPPING_PROOFS, DEAD_LETTERS),
    consumers=(EXECUTOR, PERSISTENCE, PERSISTENCE_PROOFS),
    buckets=(
        OPERATIONS_BUCKET,
        HEALTH_BUCKET,
        DEVICES_BUCKET,
        ATTACHING_BUCKET,
        VOLUME_OWNERS_BUCKET,
        LEASES_BUCKET,
        SERIALS_BUCKET,
    ),
)


def topology_for(settings: Settings) -> Topology:
    """TOPOLOGY with what the settings choose: the operation records' retention."""
    ops = replace(OPERATIONS_BUCKET, ttl=settings.operation_retention)
    return replace(
        TOPOLOGY, buckets=tuple(ops if b.name == ops.name else b for b in TOPOLOGY.buckets)
    )
