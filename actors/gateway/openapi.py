"""The OpenAPI 3.1 document of the REST gateway, generated from its routes (``routes.py``)
and the msgspec types of its bodies (``schemas.rest``).

Served at /api/v1/openapi.json and checked in as docs/openapi.json; after changing a route
or a type: ``python -m actors.gateway > docs/openapi.json`` (a test compares them).
"""

from __future__ import annotations

import json
from typing import Any, get_args, get_origin

import msgspec

from actors.gateway.routes import NOT_OFFERED, ROUTES, Route
from schemas.rest import ErrorBody

_REF = "#/components/schemas/{name}"
_ERRORS = {
    "400": "bad JSON, a wrong type or value (the field is named)",
    "404": "an unknown id or route",
    "409": "the Idempotency-Key names an operation of another command",
    "413": "a body over 64 KiB",
    "503": "NATS, or volumed behind it, is not reachable",
}


def _types() -> list[Any]:
    found: list[Any] = [ErrorBody]
    for route in ROUTES:
        for t in (route.body, route.answer):
            if t is None:
                continue
            inner = get_args(t)[0] if get_origin(t) is list else t
            if inner not in found:
                found.append(inner)
    return found


def _ref(t: Any) -> dict[str, Any]:
    if get_origin(t) is list:
        return {"type": "array", "items": _ref(get_args(t)[0])}
    return {"$ref": _REF.format(name=t.__name__)}


def _content(t: Any) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(t)}}


def _operation(route: Route, operation_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "operationId": operation_id}
    params: list[dict[str, Any]] = []
    for name in ("id", "path"):
        if f"{{{name}" in route.path:
            params.append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )
    for name in route.query:
        schema = {"type": "integer"} if name == "limit" else {"type": "string"}
        params.append({"name": name, "in": "query", "required": False, "schema": schema})
    if route.idempotent_key:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "the operation id (1 to 64 of A-Z a-z 0-9 _ -): a retried "
                "request with the same key makes no second operation",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            }
        )
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": _content(route.body)}
    answer: dict[str, Any] = {"description": "OK" if route.status == 200 else "Created"}
    if route.answer is not None:
        answer["content"] = _content(route.answer)
    else:
        answer["content"] = {"application/json": {"schema": {"type": "object"}}}
    op["responses"] = {str(route.status): answer}
    for status in _ERRORS:
        op["responses"][status] = {"$ref": f"#/components/responses/{status}"}
    return op


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_types(), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for route in ROUTES:
        # Unique, as OpenAPI asks: a second path to one handler (/health) is numbered.
        operation_id = route.handler
        while operation_id in seen:
            operation_id += "_2"
        seen.add(operation_id)
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(
            route, operation_id
        )
    for method, path, what in NOT_OFFERED:
        not_offered = {
            "summary": f"Not offered by volumed: {what}",
            "responses": {"501": {"description": "not offered", "content": _content(ErrorBody)}},
        }
        open_path = path.replace("{tail:.*}", "")
        methods = ("get", "post", "put", "delete") if method == "*" else (method.lower(),)
        for m in methods:
            paths.setdefault(open_path, {})[m] = not_offered
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "volumed REST gateway",
            "version": "1",
            "description": "The Go volume daemon's API, served by volumed over its NATS "
            "commands and queries (contract §7; docs/rest-api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                status: {"description": why, "content": _content(ErrorBody)}
                for status, why in _ERRORS.items()
            },
        },
    }


def text() -> str:
    """The document as checked in: sorted keys, indented, one final newline."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"
