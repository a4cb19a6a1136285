"""Messages between actors that users never need to see (still plain JSON on NATS)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from msgspec import Struct

from schemas.common import OpType, Status
from schemas.events import ErrorInfo, OperationEvent


class Phase(StrEnum):
    """The steps of an operation, as its record names them (stored as these strings).

    Each step that sends a CloudStack mutation is also the key of its answer in
    ``OpRecord.results``; a ``*_RELEASE`` step waits for the detached volume's device to
    go, after its detach."""

    NONE = ""  # nothing sent yet
    CREATE = "create"
    ATTACH = "attach"
    CORRELATE = "correlate"  # attached; its device is being proven
    ROLLBACK = "rollback"  # no device proven: detaching the attachment it made
    ROLLBACK_RELEASE = "rollback-release"
    DETACH = "detach"
    DETACH_RELEASE = "detach-release"
    DETACH_FIRST = "detach-first"  # a delete detaching an attached volume first
    DETACH_FIRST_RELEASE = "detach-first-release"
    DELETE = "delete"
    RESIZE = "resize"

    @property
    def release(self) -> Phase:
        """The step that waits for the device to go after this detach step."""
        return Phase(f"{self.value}-release")

    @property
    def rolling_back(self) -> bool:
        return self in (Phase.ROLLBACK, Phase.ROLLBACK_RELEASE)

    @property
    def detaching_first(self) -> bool:
        return self in (Phase.DETACH_FIRST, Phase.DETACH_FIRST_RELEASE)


class OpRecord(Struct, kw_only=True):
    """The executor's durable record of one operation, kept in a JetStream KV bucket.

    Creating it is the idempotency claim (KV create fails when the key exists) and it is
    updated compare-and-set, so an executor and a cancel never both win. It is also what a
    restarted executor resumes from: the CloudStack job id is written before it is awaited.
    """

    operation_id: str
    type: OpType
    status: Status
    stream_seq: int  # sequence of the accepted command in the command stream
    command: bytes = b""  # the validated command as received (JSON)
    volume_id: str | None = None
    vm_id: str | None = None
    job_id: str | None = None
    # Which step the operation is in: job_id and mutation_sent belong to this step.
    phase: Phase = Phase.NONE
    # Set (to CloudStack's time, as its answers tell it) just before a CloudStack mutation is
    # sent, so that a restart or a lost answer knows it may have happened and looks before
    # sending it again.
    mutation_sent: float | None = None
    attach_started_at: float | None = None
    attach_clock: str | None = None  # whose clock attach_started_at is on (Settings.clock)
    # CloudStack's answer to each step whose mutation has completed, by phase: a resumed
    # operation skips those steps instead of sending them again.
    results: dict[str, Any] = {}
    last_event: OperationEvent | None = None
    accepted_at: str = ""
    # Which delivery of the command claimed the id, and how many deliveries started to run
    # the operation since (past its turn): the deliveries that count against the consumer's
    # give_up_after; those that only waited for their turn and were handed back do not.
    claimed_on: int = 1
    runs: int = 0
    # The run that holds the operation (the record is the executor's lease on it: see
    # actors/executor/run.py): set by the write that starts the run or takes it over, kept
    # fresh by the holder's writes, cleared by the terminal write or when the run lets go.
    # Empty: no process runs it now.
    holder: str = ""


class SerialsShown(Struct, kw_only=True):
    """A VM whose devices carry serials (the serials bucket, key: vm id): the attach that
    showed it, and when (for people; nothing compares it)."""

    operation_id: str
    at: str


class AttachInFlight(Struct, kw_only=True):
    """Executor → correlator: an attach that may be running in CloudStack (the attaching
    bucket, key: operation id). Written before the attach turns ``executing``, deleted once
    its record is terminal, so the bucket holds only what is in flight."""

    operation_id: str
    volume_id: str
    vm_id: str
    accepted_at: str = ""  # RFC 3339, when the command was accepted
    started_at: float | None = None  # time.time() just before attachVolume was sent
    clock: str | None = None  # whose clock accepted_at and started_at are on (Settings.clock)


class CreatesQuery(Struct, kw_only=True):
    """Executor → persistence (CREATES_SUBJECT): which other creates of these parameters may
    have made a volume they have not claimed yet. Asked only by a create whose answer was
    lost and that found a matching volume no operation holds."""

    operation_id: str  # the asking create (never in the answer)
    name: str
    size: int  # bytes
    zone_id: str
    disk_offering_id: str


class CreatesInDoubt(Struct, kw_only=True):
    """Persistence's answer to a CreatesQuery, once the database holds every event published
    before the query arrived: the creates of those parameters not ended, and those that
    failed within a day without naming a volume (their createVolume may have made one).
    ``error`` set: persistence cannot tell now (database away or behind), ``operations``
    is then empty and means nothing."""

    operations: list[str] = []
    error: str = ""


class LeaseHolder(Struct, kw_only=True):
    """Who holds a lease (the leases bucket, bus.lease): the process and a token of this one
    acquisition, so that a renewal whose answer was lost is recognised as its own."""

    holder: str
    token: str
    at: float  # time.time() of the last renewal (for people: leases never compare clocks)


class VolumeOwner(Struct, kw_only=True):
    """The create operation a volume belongs to (the volume owners bucket, key: volume id).
    Creating the key is the claim; it is removed when volumed deletes the volume."""

    operation_id: str
    at: float  # time.time() of the claim


class CorrelateRequest(Struct, kw_only=True):
    """Executor → correlator: an attach to the local VM finished in CloudStack."""

    operation_id: str
    volume_id: str
    vm_id: str
    size: int  # bytes, from CloudStack
    serial: str  # the serial the device will have if the hypervisor sets one
    started_at: float  # time.time() just before the attach was sent
    clock: str | None = None  # whose clock started_at is on (Settings.clock)


class CorrelateResult(Struct, kw_only=True):
    operation_id: str
    volume_id: str
    device_path: str | None = None
    by_id_path: str | None = None
    size: int | None = None
    error: ErrorInfo | None = None
    # How the device was proven to be the volume's: "serial" (its serial is the volume's) or
    # "exclusive" (no serial: the only fitting device and no other attach could own it).
    proof: str = ""


class ReleaseRequest(Struct, kw_only=True):
    """Executor → correlator: a volume was detached from the local VM; wait for its device
    to go and forget the mapping."""

    operation_id: str
    volume_id: str
    device_path: str | None = None


class ReleaseResult(Struct, kw_only=True):
    operation_id: str
    volume_id: str
    gone: bool
    message: str = ""


class Heartbeat(Struct, kw_only=True):
    """An actor's own health checks, refreshed in the health KV bucket."""

    actor: str
    instance: str
    at: float
    checks: dict[str, CheckResult]


class CheckResult(Struct, kw_only=True):
    status: Status | str
    detail: str = ""


class CloudStackCredentials(Struct, kw_only=True):
    """Persistence → executor: the active ossea_configs row (or its absence)."""

    endpoint: str | None = None
    key: str | None = None
    secret: str | None = None
    vm_id: str | None = None
    error: str | None = None
    # The row could not be read just now (the database away, persistence starting): the
    # executor asks again instead of failing the operation `unauthorized`.
    transient: bool = False

    def __repr__(self) -> str:  # never let the secret reach a log line
        return f"CloudStackCredentials(endpoint={self.endpoint!r}, key={self.key!r}, secret=***)"
