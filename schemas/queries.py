"""Requests and replies of the ``volumed`` micro service (contract §4)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from schemas.common import CloudStackId, OperationId, OpType, Status

# What an id's pattern allows, in words, for a 400's text (explain_validation_error):
# CloudStack ids are its default, but '.' is not allowed in an operation id.
PATTERN_WORDS = {"operation_id": "an operation id: 1 to 64 characters of A-Z a-z 0-9 _ -"}


class OperationQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    operation_id: OperationId


class OperationsQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    type: OpType | None = None
    status: Status | None = None
    volume_id: CloudStackId | None = None
    vm_id: CloudStackId | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class MappingQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    volume_id: CloudStackId | None = None
    device_path: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    # With device_path: whose device (a device path is unique per VM only: several hosts
    # share one database). Needed only when several VMs have a mapping at that path.
    vm_id: CloudStackId | None = None


class VmVolumesQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    vm_id: CloudStackId


class HealthQuery(Struct, kw_only=True):
    """Any JSON object (fields are ignored): health takes no parameters."""


class Operation(Struct, kw_only=True, omit_defaults=False):
    operation_id: str
    type: str
    status: str
    volume_id: str | None
    vm_id: str | None
    device_path: str | None
    by_id_path: str | None
    error: dict[str, str] | None
    at: str | None
    request: Any
    response: Any
    created_at: str | None
    updated_at: str | None
    completed_at: str | None
    target: str | None = None  # the operation a cancel acts on


class Mapping(Struct, kw_only=True, omit_defaults=False):
    volume_id: str
    vm_id: str
    device_path: str | None
    by_id_path: str | None
    size: int | None  # bytes
    last_sync: str | None
    operation_id: str | None = None  # the attach that created the mapping
    # The latest proof of device_path since the attach ("serial", "exclusive", or "none":
    # device_path is null because no device can be proven to be the volume's now, for
    # ``proof_reason``); null: as the attach proved it.
    proof: str | None = None
    proof_reason: str | None = None
    proven_at: str | None = None


HealthStatus = Literal["ok", "degraded", "down"]


class Check(Struct, kw_only=True):
    status: HealthStatus
    detail: str


class Health(Struct, kw_only=True):
    status: HealthStatus
    checks: dict[str, Check]


class Operations(Struct, kw_only=True):
    operations: list[Operation]


class VmVolumes(Struct, kw_only=True):
    volumes: list[Mapping]
