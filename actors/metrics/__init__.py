"""Every metric volumed exports, declared once, here, with its help text.

Where a number comes from decides what one process's /metrics shows when several run:

- **this process**: what its own actors did (CloudStack calls, retries, device events,
  correlations, actor up). Different in every process: sum them.
- **the event stream**: operations and their durations, counted from ``volume.events.>`` by
  every process that serves metrics. Each sees every operation, so each shows the same
  rates: aggregate with ``max``, never ``sum``. Each metric's help says "(event stream)".
- **the server**: consumer lag, redeliveries, dead letters, actors reporting, read from NATS
  at scrape time: the same from any process (``max``). Each help says "(server)".

Labels hold only enumerations and names (operation types, statuses, error codes, CloudStack
command names, stream and consumer names): never an id, a URL or a secret.
``actors.metrics.exporter`` serves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# A *_created series per counter doubles the output and no rule or panel needs it.
disable_created_metrics()
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Seconds: CloudStack answers in milliseconds in a quiet cloud and in minutes in a busy one.
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# -- this process ----------------------------------------------------------------------------

ACTOR_UP = Gauge(
    "volumed_actor_up",
    "1 while this process runs the actor; 0 while it waits to start (the watcher and the "
    "correlator wait for the VM id) or once it has stopped (this process)",
    ["actor"],
    registry=REGISTRY,
)
CLOUDSTACK_CALLS = Counter(
    "volumed_cloudstack_calls_total",
    "CloudStack API requests sent, by command (this process)",
    ["command"],
    registry=REGISTRY,
)
CLOUDSTACK_ERRORS = Counter(
    "volumed_cloudstack_errors_total",
    "CloudStack requests and async jobs that failed, by command and kind: the contract's "
    "error code (cloudstack_unavailable: transient, retried) (this process)",
    ["command", "kind"],
    registry=REGISTRY,
)
CLOUDSTACK_SECONDS = Histogram(
    "volumed_cloudstack_call_duration_seconds",
    "Time one CloudStack API request took, answer or error, by command (this process)",
    ["command"],
    buckets=_SLOW,
    registry=REGISTRY,
)
RETRIES = Counter(
    "volumed_cloudstack_retries_total",
    "Waits before trying CloudStack again after a transient failure (this process)",
    registry=REGISTRY,
)
RETRIES_EXHAUSTED = Counter(
    "volumed_cloudstack_retries_exhausted_total",
    "Steps that gave up with cloudstack_unavailable once the retry budget "
    "(VOLUMED_CLOUDSTACK_RETRY_BUDGET) was spent (this process)",
    registry=REGISTRY,
)
DEVICE_EVENTS = Counter(
    "volumed_device_events_total",
    "Device events the watcher published, by kind (added, removed, changed, inventory) and "
    "what saw them (uevent, rescan, start) (this process)",
    ["kind", "source"],
    registry=REGISTRY,
)
CORRELATIONS = Counter(
    "volumed_correlations_total",
    "Attaches the correlator decided, by result: the proof (serial, exclusive) or the error "
    "code (device_timeout, ambiguous_device) (this process)",
    ["result"],
    registry=REGISTRY,
)
CORRELATION_SECONDS = Histogram(
    "volumed_correlation_latency_seconds",
    "From a device's appearance (as the watcher saw it) to the correlator's decision that "
    "it is its attach's volume, which completes the attach (this process)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
ATTACHES_WAITING = Gauge(
    "volumed_attaches_waiting",
    "Attaches to this host that CloudStack completed and that wait for their device "
    "(this process's correlator)",
    registry=REGISTRY,
)
EVENTS_STORED = Counter(
    "volumed_events_stored_total",
    "Operation events written to the database (this process's persistence)",
    registry=REGISTRY,
)
DATABASE_ERRORS = Counter(
    "volumed_database_errors_total",
    "Database writes that failed and are retried (this process's persistence)",
    registry=REGISTRY,
)

# -- the event stream --------------------------------------------------------------------------

OPERATIONS = Counter(
    "volumed_operations_total",
    "Operations that ended, by type, terminal status and error code ('' when none) (event stream)",
    ["type", "status", "code"],
    registry=REGISTRY,
)
OPERATION_SECONDS = Histogram(
    "volumed_operation_duration_seconds",
    "From an operation's pending event to its terminal one, by type and terminal status "
    "(event stream; operations whose pending event this process saw)",
    ["type", "status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)

# -- read at scrape time -------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A gauge whose values are read when Prometheus scrapes (``exporter``)."""

    name: str
    help: str
    labels: tuple[str, ...] = ()

    def gauge(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.help, labels=list(self.labels))


STUCK_AFTER = 300.0
"""Seconds after which an operation that has not ended counts as stuck."""

OPERATIONS_IN_FLIGHT = Family(
    "volumed_operations_in_flight",
    "Operations pending or executing, by type and status (event stream; those whose events "
    "this process saw)",
    ("type", "status"),
)
OPERATIONS_STUCK = Family(
    "volumed_operations_stuck",
    f"Operations pending or executing for more than {STUCK_AFTER:.0f} s, by type (event "
    "stream, checked against the newest stored event of each)",
    ("type",),
)
CONSUMER_PENDING = Family(
    "volumed_consumer_pending_messages",
    "Messages of the stream not yet given to the consumer: its lag (server)",
    ("stream", "consumer"),
)
CONSUMER_ACK_PENDING = Family(
    "volumed_consumer_ack_pending_messages",
    "Messages given to the consumer and not yet acknowledged: in flight (server)",
    ("stream", "consumer"),
)
CONSUMER_REDELIVERED = Family(
    "volumed_consumer_redelivered_messages",
    "Messages in flight that were delivered more than once (server)",
    ("stream", "consumer"),
)
DEAD_LETTERS = Family(
    "volumed_dead_letters",
    "Messages held in VOLUMED_DEAD_LETTERS, by the stream and consumer that gave up on them "
    "(server)",
    ("stream", "consumer"),
)
ACTORS_REPORTING = Family(
    "volumed_actors_reporting",
    "Instances of the actor whose heartbeat is fresh in the health bucket, in any process "
    "(server; the persistence actor sends none)",
    ("actor",),
)
SERVER_UP = Family(
    "volumed_server_metrics_up",
    "1 when this scrape read the server's numbers; 0: the (server) metrics are missing from it",
)

SCRAPED: tuple[Family, ...] = (
    OPERATIONS_IN_FLIGHT,
    OPERATIONS_STUCK,
    CONSUMER_PENDING,
    CONSUMER_ACK_PENDING,
    CONSUMER_REDELIVERED,
    DEAD_LETTERS,
    ACTORS_REPORTING,
    SERVER_UP,
)
