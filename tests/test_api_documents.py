"""The checked-in API documents (docs/asyncapi.json, docs/schemas/) are what the types and
the topology make, are well-formed, name every subject of the contract, and say what the
decoders accept. No NATS needed: these only read files and types."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from actors.apidocs import ASYNCAPI_FILE, REGENERATE, SCHEMAS_DIR, asyncapi, documents
from actors.persistence.api import Api
from bus.topology import API_QUERIES
from schemas.commands import COMMAND_TYPES
from schemas.common import ErrorCode

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Contract §2-§4, as the contract spells them.
CONTRACT_COMMANDS = ("create", "attach", "detach", "delete", "cancel")
CONTRACT_QUERIES = ("operation", "operations", "mapping", "vm_volumes", "health")


def test_checked_in_documents_are_generated() -> None:
    """Fails when a message type or a subject changed without regenerating the documents."""
    files = documents()
    checked_in = {f"{SCHEMAS_DIR}/{p.name}" for p in (DOCS / SCHEMAS_DIR).glob("*.json")} | (
        {ASYNCAPI_FILE} if (DOCS / ASYNCAPI_FILE).exists() else set()
    )
    assert checked_in == set(files), f"docs/ is out of date: run `{REGENERATE}`"
    stale = [name for name, text in files.items() if (DOCS / name).read_text() != text]
    assert not stale, f"{stale} differ from what the types make: run `{REGENERATE}`"


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_asyncapi_document_is_well_formed() -> None:
    """The fields AsyncAPI 3.0 requires, and every reference resolves."""
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str) and isinstance(doc["info"]["version"], str)
    for server in doc["servers"].values():
        assert server["protocol"] == "nats" and server["host"]
    for ref in _refs(doc):
        _resolve(doc, ref)
    key = re.compile(r"^[A-Za-z0-9_\-]+$")
    for name, channel in doc["channels"].items():
        assert key.match(name), name
        address = channel["address"]
        assert address is None or isinstance(address, str)
        params = set(re.findall(r"\{([^}]+)\}", address or ""))
        assert params == set(channel.get("parameters", {})), name
        assert channel["messages"], name
    for name, op in doc["operations"].items():
        assert key.match(name), name
        assert op["action"] in ("send", "receive"), name
        channel = op["channel"]["$ref"]
        for m in op["messages"]:
            # An operation's messages are its channel's.
            assert m["$ref"].startswith(f"{channel}/messages/"), (name, m)
        if "reply" in op:
            reply = op["reply"]["channel"]["$ref"]
            assert all(m["$ref"].startswith(f"{reply}/messages/") for m in op["reply"]["messages"])
    for message in doc["components"]["messages"].values():
        assert message["contentType"] == "application/json" and "payload" in message
    codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
    assert codes == list(get_args(ErrorCode))


def test_every_contract_subject_is_documented() -> None:
    doc = asyncapi()
    public = {
        c["address"]: c
        for c in doc["channels"].values()
        if c["address"] and {"name": "public"} in c["tags"]
    }
    internal = {c["address"] for c in doc["channels"].values() if {"name": "internal"} in c["tags"]}
    for op_type in {*CONTRACT_COMMANDS, *COMMAND_TYPES}:
        assert f"volume.cmd.{op_type}" in public, op_type
    assert "volume.events.{operation_id}" in public
    for name in CONTRACT_QUERIES:
        assert f"volume.api.{name}" in public, name
    assert not any(a and a.startswith("volume.") for a in internal)
    assert public["volume.cmd.create"]["x-jetstream-stream"] == "VOLUMED_COMMANDS"
    assert public["volume.events.{operation_id}"]["x-jetstream-stream"] == "VOLUMED_EVENTS"
    # 404 only where an id can be unknown (contract §4).
    errors = {
        op["channel"]["$ref"].rsplit("_", 1)[-1]: {
            m["$ref"].rsplit("/", 1)[-1] for m in op["reply"]["messages"]
        }
        for name, op in doc["operations"].items()
        if name.startswith("answer_")
    }
    assert "ServiceError404" in errors["operation"] and "ServiceError404" in errors["mapping"]
    assert all("ServiceError400" in e for e in errors.values())


def test_documented_queries_are_the_services_endpoints() -> None:
    endpoints = Api.endpoints(object.__new__(Api))
    assert {q.name for q in API_QUERIES} == set(endpoints) == set(CONTRACT_QUERIES)
    for q in API_QUERIES:
        assert endpoints[q.name][0] == f"volume.api.{q.name}"


# -- the command schemas against the decoder -----------------------------------------------
# A small validator of the keywords msgspec emits; a keyword it does not know fails the test
# rather than passing silently.

_IGNORED = {"$schema", "title", "description", "default", "$defs"}


def _valid(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    if "$ref" in schema:
        return _valid(_resolve(root, schema["$ref"]), value, root)
    checks = {
        "type": lambda t: _is_type(value, t),
        "anyOf": lambda alts: any(_valid(a, value, root) for a in alts),
        "enum": lambda options: value in options,
        "const": lambda c: value == c,
        "pattern": lambda p: not isinstance(value, str) or re.search(p, value) is not None,
        "minLength": lambda n: not isinstance(value, str) or len(value) >= n,
        "maxLength": lambda n: not isinstance(value, str) or len(value) <= n,
        "minimum": lambda n: not _is_number(value) or value >= n,
        "maximum": lambda n: not _is_number(value) or value <= n,
        "exclusiveMinimum": lambda n: not _is_number(value) or value > n,
        "multipleOf": lambda n: not _is_number(value) or value % n == 0,
        "maxProperties": lambda n: not isinstance(value, dict) or len(value) <= n,
        "required": lambda names: not isinstance(value, dict) or all(k in value for k in names),
        "properties": lambda props: (
            not isinstance(value, dict)
            or all(_valid(s, value[k], root) for k, s in props.items() if k in value)
        ),
        "additionalProperties": lambda s: (
            not isinstance(value, dict)
            or all(
                (s is not False) and (s is True or _valid(s, v, root))
                for k, v in value.items()
                if k not in schema.get("properties", {})
            )
        ),
        "propertyNames": lambda s: (
            not isinstance(value, dict) or all(_valid(s, k, root) for k in value)
        ),
        "items": lambda s: not isinstance(value, list) or all(_valid(s, v, root) for v in value),
    }
    for keyword, arg in schema.items():
        if keyword in _IGNORED:
            continue
        assert keyword in checks, f"the test's validator does not know {keyword!r}"
        if not checks[keyword](arg):
            return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_type(value: Any, t: str) -> bool:
    # "integer" as the decoder has it: 2.0 is a float (JSON Schema would take it; the
    # AsyncAPI document's command messages say so).
    return {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": _is_number(value),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[t]


def _example(schema: dict[str, Any]) -> Any:
    """A value the property's schema allows (the first alternative of an anyOf)."""
    if "anyOf" in schema:
        return _example(schema["anyOf"][0])
    if "enum" in schema:
        return schema["enum"][0]
    return {
        "string": "vol-1",
        "integer": schema.get("multipleOf", 1),
        "boolean": True,
        "object": {"k": "v"},
    }[schema["type"]]


# Each is tried in place of each field of a good body: wrong types, bad ids and sizes.
_CANDIDATES: list[Any] = [
    None,
    True,
    0,
    -1,
    7,
    1.5,
    2**30,
    3 * 2**30,
    "",
    "vol-2",
    "a b",
    "x~y",
    "a.b",
    "x" * 65,
    [],
    ["vol-1"],
    {},
    {"k": "v"},
    {"": "v"},
    {"k": 5},
]


@pytest.mark.parametrize("op_type", sorted(COMMAND_TYPES))
def test_command_schema_accepts_what_the_decoder_accepts(op_type: str) -> None:
    command = COMMAND_TYPES[op_type]
    schema = json.loads((DOCS / SCHEMAS_DIR / f"{command.__name__}.json").read_text())
    good = {name: _example(schema["properties"][name]) for name in schema["required"]}
    decoder = msgspec.json.Decoder(command)

    def decodes(body: dict[str, Any]) -> bool:
        try:
            decoder.decode(json.dumps(body))
        except msgspec.ValidationError:
            return False
        return True

    assert decodes(good) and _valid(schema, good, schema), good
    rejected = 0
    for name in schema["properties"]:
        for value in _CANDIDATES:
            body = {**good, name: value}
            assert _valid(schema, body, schema) == decodes(body), body
            rejected += not decodes(body)
    for name in schema["required"]:
        body = {k: v for k, v in good.items() if k != name}
        assert not _valid(schema, body, schema) and not decodes(body), body
    assert rejected  # the candidates did try wrong types
    # Unknown fields are ignored (contract §2), in the schema as in the decoder.
    assert _valid(schema, {**good, "newer": 1}, schema) and decodes({**good, "newer": 1})
