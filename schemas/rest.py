"""Bodies of the REST gateway (contract §7): the Go daemon's routes and shapes, as its
callers decode them (``../shared/reference/go-daemon-api.md``).

The request bodies reuse the commands' field types, so a body the gateway accepts is a
command volumed accepts, and a refusal names the field as a rejected command would. The
OpenAPI document (``actors.gateway.openapi``) is generated from these types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from schemas.commands import MetadataKey, MetadataValue, VolumeSize
from schemas.common import CloudStackId, VolumeName

# A larger body answers 413 (the commands' own limit, contract §2).
MAX_BODY_BYTES = 64 * 1024

# Times are RFC 3339 in UTC ("2026-01-02T03:04:05.000000Z"): what Go's time.Time decodes.
Time = Annotated[
    str, Meta(description="RFC 3339 time (UTC)", extra_json_schema={"format": "date-time"})
]


class CreateVolumeRequest(Struct, kw_only=True):
    """POST /api/v1/volumes: a CreateCommand without the operation id (which comes from
    the Idempotency-Key header, or is made by the gateway)."""

    name: VolumeName
    size: VolumeSize
    disk_offering_id: CloudStackId
    zone_id: CloudStackId
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=64)] | None = None


class AttachVolumeRequest(Struct, kw_only=True):
    """POST /api/v1/volumes/{id}/attach and /attach-root. Later Go callers also send
    ``vm_name``, ``disk_id`` and ``request_persistent_name``: accepted and ignored (volumed
    names a device by its stable by-id link instead)."""

    vm_id: CloudStackId


# OperationStatus as Go callers know it: volumed's ``rejected`` is shown as ``failed`` (with
# the reason in ``error``), so that a caller polling until completed/failed/cancelled stops.
RestStatus = Literal["pending", "executing", "completed", "failed", "cancelled"]


class RestOperation(Struct, kw_only=True, omit_defaults=False):
    """An operation as the Go daemon's callers decode it, plus volumed's own fields
    (``error_code``, ``device_path``, ``by_id_path``) which they ignore."""

    id: str
    type: str
    status: RestStatus
    volume_id: Annotated[str, Meta(description='"" until a create knows its volume')]
    vm_id: str | None
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: Annotated[str | None, Meta(description="what went wrong, in words")]
    created_at: Time
    updated_at: Time
    completed_at: Time | None
    error_code: Annotated[str | None, Meta(description="the contract's error code")] = None
    device_path: str | None = None
    by_id_path: str | None = None


class RestMapping(Struct, kw_only=True, omit_defaults=False):
    """A device mapping as Go callers decode it (``DeviceMapping``), plus volumed's proof
    of it. ``device_path`` is null when no device of this host is proven to be the volume
    (attached to another VM, or the proof failed: ``proof_reason``)."""

    id: Annotated[str, Meta(description="the attach operation that made the mapping")]
    volume_id: str
    vm_id: str
    device_path: str | None
    cloudstack_state: Literal["attached"]
    linux_state: Annotated[
        Literal["present", "unproven"],
        Meta(description="present: the device is proven to be the volume's"),
    ]
    size: int | None
    last_sync: Time | None
    created_at: Time | None
    updated_at: Time | None
    by_id_path: str | None = None
    proof: str | None = None
    proof_reason: str | None = None
    proven_at: Time | None = None


class VmVolume(Struct, kw_only=True, omit_defaults=False):
    """One entry of GET /api/v1/vms/{id}/volumes."""

    volume_id: str
    vm_id: str
    device_path: str | None
    attached_at: Time | None


class VolumeStatus(Struct, kw_only=True, omit_defaults=False):
    """GET /api/v1/volumes/{id}: what volumed knows of the volume from its operations and
    mapping (the gateway never asks CloudStack: ``cloudstack_data`` is empty)."""

    volume_id: str
    vm_id: str | None
    device_path: str | None
    state: Annotated[
        Literal["attached", "available", "deleted", "unknown"],
        Meta(description="from the mapping and the last completed operation"),
    ]
    size: int | None
    cloudstack_data: dict[str, Any]
    linux_data: dict[str, Any] | None
    last_operation: RestOperation | None


class HealthDocument(Struct, kw_only=True, omit_defaults=False):
    """GET /health and /api/v1/health: the Go daemon's fields from volumed's checks. 200
    while ``ok`` or ``degraded``, 503 when ``down``."""

    status: Literal["healthy", "degraded", "unhealthy"]
    timestamp: Time
    cloudstack_health: str
    database_health: str
    device_monitor: str
    details: dict[str, str]


class ForceSyncResult(Struct, kw_only=True):
    """POST /api/v1/admin/force-sync."""

    message: str
    timestamp: Time
    vm_ids: list[str]


class ErrorBody(Struct, kw_only=True):
    """Every error answer."""

    error: str
    code: Annotated[
        str,
        Meta(
            description="invalid_request, not_found, conflict, too_large, unavailable, "
            "not_implemented, internal, or an operation's error code"
        ),
    ]
