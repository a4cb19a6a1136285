"""Requests and replies of the ``volumed`` micro service (contract §4)."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from schemas.common import CloudStackId, OperationId, OpType, Status


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


class VmVolumesQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    vm_id: CloudStackId


class HealthQuery(Struct, kw_only=True):
    pass


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


class Mapping(Struct, kw_only=True, omit_defaults=False):
    volume_id: str
    vm_id: str
    device_path: str | None
    by_id_path: str | None
    size: int | None
    last_sync: str | None


class Check(Struct, kw_only=True):
    status: str  # ok | degraded | down
    detail: str


class Health(Struct, kw_only=True):
    status: str
    checks: dict[str, Check]
