"""Every route of the REST gateway, declared once as data: the server registers these and
the OpenAPI document (``actors.gateway.openapi``) describes these."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from bus.topology import API_HEALTH, API_MAPPING, API_OPERATION, API_OPERATIONS, API_VM_VOLUMES
from schemas.rest import (
    AttachVolumeRequest,
    CreateVolumeRequest,
    ForceSyncResult,
    HealthDocument,
    RestMapping,
    RestOperation,
    VmVolume,
    VolumeStatus,
)

PREFIX = "/api/v1"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """As aiohttp matches it: ``{name}`` a path segment, ``{name:regex}`` more."""
    handler: str
    """The GatewayActor method that answers it."""
    summary: str
    status: int = 200
    answer: Any = None
    """The type of the answer body (a list type for an array)."""
    body: type | None = None
    query: tuple[str, ...] = ()
    idempotent_key: bool = False
    """Takes an ``Idempotency-Key`` header (the operation id)."""

    @property
    def openapi_path(self) -> str:
        return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", self.path)


# GET /api/v1/operations's query parameters: the operations query's fields, in its order.
OPERATIONS_FILTERS = tuple(f.name for f in msgspec.structs.fields(API_OPERATIONS.request))

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        f"{PREFIX}/volumes",
        "create",
        "Create a volume (volume.cmd.create)",
        status=201,
        answer=RestOperation,
        body=CreateVolumeRequest,
        idempotent_key=True,
    ),
    Route(
        "POST",
        f"{PREFIX}/volumes/{{id}}/attach",
        "attach",
        "Attach a volume to a VM (volume.cmd.attach)",
        status=201,
        answer=RestOperation,
        body=AttachVolumeRequest,
        idempotent_key=True,
    ),
    Route(
        "POST",
        f"{PREFIX}/volumes/{{id}}/attach-root",
        "attach_root",
        "Attach a volume as a VM's root disk (volume.cmd.attach, as_root)",
        status=201,
        answer=RestOperation,
        body=AttachVolumeRequest,
        idempotent_key=True,
    ),
    Route(
        "POST",
        f"{PREFIX}/volumes/{{id}}/detach",
        "detach",
        "Detach a volume (volume.cmd.detach)",
        status=201,
        answer=RestOperation,
        idempotent_key=True,
    ),
    Route(
        "DELETE",
        f"{PREFIX}/volumes/{{id}}",
        "delete",
        "Delete a volume, detaching it first (volume.cmd.delete)",
        status=201,
        answer=RestOperation,
        idempotent_key=True,
    ),
    Route(
        "GET",
        f"{PREFIX}/volumes/{{id}}",
        "volume",
        "What volumed knows of a volume",
        answer=VolumeStatus,
    ),
    Route(
        "GET",
        f"{PREFIX}/volumes/{{id}}/device",
        "volume_device",
        f"The device mapping of an attached volume ({API_MAPPING.subject})",
        answer=RestMapping,
    ),
    Route(
        "GET",
        f"{PREFIX}/devices/{{path:.+}}/volume",
        "device_volume",
        f"The mapping of a device path, given without its leading / ({API_MAPPING.subject})",
        answer=RestMapping,
    ),
    Route(
        "GET",
        f"{PREFIX}/vms/{{id}}/volumes",
        "vm_volumes",
        f"The volumes attached to a VM ({API_VM_VOLUMES.subject})",
        answer=list[VmVolume],
    ),
    Route(
        "GET",
        f"{PREFIX}/operations/{{id}}",
        "operation",
        f"One operation ({API_OPERATION.subject})",
        answer=RestOperation,
    ),
    Route(
        "GET",
        f"{PREFIX}/operations",
        "operations",
        f"Operations matching every filter given, newest first ({API_OPERATIONS.subject})",
        answer=list[RestOperation],
        query=OPERATIONS_FILTERS,
    ),
    Route(
        "POST",
        f"{PREFIX}/admin/force-sync",
        "force_sync",
        "Ask the correlators to prove every device mapping again now",
        answer=ForceSyncResult,
    ),
    Route("GET", "/health", "health", f"Health ({API_HEALTH.subject})", answer=HealthDocument),
    Route(
        "GET", f"{PREFIX}/health", "health", f"Health ({API_HEALTH.subject})", answer=HealthDocument
    ),
    Route("GET", f"{PREFIX}/openapi.json", "openapi", "This document"),
)

# The Go daemon's routes volumed does not offer: 501 naming the route (docs/rest-api.md).
NOT_OFFERED: tuple[tuple[str, str, str], ...] = (
    ("*", f"{PREFIX}/snapshots{{tail:.*}}", "snapshot tracking"),
    ("*", f"{PREFIX}/exports{{tail:.*}}", "NBD exports"),
    ("POST", f"{PREFIX}/cleanup/test-failover", "test-failover clean-up"),
    ("GET", f"{PREFIX}/metrics", "JSON metrics (volumed serves Prometheus: VOLUMED_METRICS_ADDR)"),
)
