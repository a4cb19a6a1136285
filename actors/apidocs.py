"""The bus API's documents, generated from the msgspec types (``schemas``) and the subjects
declared in ``bus.topology``: an AsyncAPI 3.0 document of every subject volumed uses
(docs/asyncapi.json) and one JSON Schema (2020-12) per public message type
(docs/schemas/<Type>.json).

Checked in; after changing a message type or a subject, regenerate them with
``python -m actors.apidocs`` (tests/test_api_documents.py compares them).

The document describes volumed the application, so its operations are volumed's: it
*receives* commands and queries and *sends* events; a client does the opposite.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import msgspec

from bus.topology import (
    API_QUERIES,
    CONFIG_SUBJECT,
    CREATES_SUBJECT,
    DEAD_LETTER_PREFIX,
    REPROVE_SUBJECT,
    TOPOLOGY,
    command_subject,
    correlate_request_subject,
    correlate_result_subject,
    device_subject,
    event_subject,
    proof_subject,
    release_request_subject,
    release_result_subject,
)
from schemas.commands import COMMAND_TYPES, MAX_COMMAND_BYTES
from schemas.common import ErrorCode
from schemas.devices import DeviceEvent, MappingProof
from schemas.events import OperationEvent
from schemas.internal import (
    CloudStackCredentials,
    CorrelateRequest,
    CorrelateResult,
    CreatesInDoubt,
    CreatesQuery,
    ReleaseRequest,
    ReleaseResult,
)

ASYNCAPI_FILE = "asyncapi.json"
SCHEMAS_DIR = "schemas"
REGENERATE = "python -m actors.apidocs"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_REF = "#/components/schemas/{name}"

# The micro service's error codes (bus.service.serve): Nats-Service-Error-Code headers.
SERVICE_ERRORS = {
    "400": "a bad request: not JSON, an unknown field, a wrong type or value (the text names "
    "the field)",
    "404": "an unknown id: no such operation, or no mapping (the volume is not attached)",
    "503": "the database is not open (yet): try again later; volumed health says why",
    "500": "anything else; the text says to see the volumed log",
}


@dataclass(frozen=True)
class Internal:
    """A subject between volumed's own actors: not for users, and free to change."""

    channel: str
    address: str
    message: type | None
    sender: str
    receiver: str
    summary: str
    reply: type | dict[str, Any] | None = None


INTERNAL = (
    Internal(
        "device_events",
        device_subject("{vm_id}"),
        DeviceEvent,
        "watcher",
        "correlator",
        "the block devices of a VM appearing, going and changing size",
    ),
    Internal(
        "correlate_attach",
        correlate_request_subject("{vm_id}"),
        CorrelateRequest,
        "executor",
        "correlator",
        "an attach to the VM finished in CloudStack: find its device",
    ),
    Internal(
        "correlate_detach",
        release_request_subject("{vm_id}"),
        ReleaseRequest,
        "executor",
        "correlator",
        "a volume was detached from the VM: wait for its device to go",
    ),
    Internal(
        "correlated_attach",
        correlate_result_subject("{operation_id}"),
        CorrelateResult,
        "correlator",
        "executor",
        "the device of an attach, or why none could be proven",
    ),
    Internal(
        "correlated_detach",
        release_result_subject("{operation_id}"),
        ReleaseResult,
        "correlator",
        "executor",
        "whether a detached volume's device is gone",
    ),
    Internal(
        "mapping_proofs",
        proof_subject("{vm_id}"),
        MappingProof,
        "correlator",
        "persistence",
        "every mapped volume of a VM proven again against the devices present now",
    ),
    Internal(
        "cloudstack_config",
        CONFIG_SUBJECT,
        None,
        "executor",
        "persistence",
        "the active ossea_configs row (request: {}); its secret travels only here",
        reply=CloudStackCredentials,
    ),
    Internal(
        "creates_in_doubt",
        CREATES_SUBJECT,
        CreatesQuery,
        "executor",
        "persistence",
        "which other creates may have made a volume not claimed yet (asked only after a lost "
        "createVolume answer found an unclaimed volume of its name, size, zone and offering)",
        reply=CreatesInDoubt,
    ),
    Internal(
        "reprove",
        REPROVE_SUBJECT,
        None,
        "REST gateway",
        "correlator",
        "prove your VM's mappings again now (request: {}; every correlator answers)",
        reply={
            "type": "object",
            "properties": {"vm_id": {"type": "string"}, "correlator": {"type": "string"}},
            "required": ["vm_id", "correlator"],
        },
    ),
    Internal(
        "dead_letters",
        f"{DEAD_LETTER_PREFIX}.{{stream}}.{{consumer}}",
        None,
        "any consumer",
        "people (nats stream view)",
        "a message a consumer gave up, as it was, with the reason in Volumed-* headers",
    ),
)

_ANY_OBJECT: dict[str, Any] = {"type": "object", "description": "any JSON object"}
_PUB_ACK: dict[str, Any] = {
    "type": "object",
    "description": "JetStream's acknowledgement: the command is stored (contract §2)",
    "properties": {
        "stream": {"type": "string"},
        "seq": {"type": "integer"},
        "duplicate": {"type": "boolean"},
    },
    "required": ["stream", "seq"],
}
_DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        name: {"type": "string", "description": why}
        for name, why in (
            ("Volumed-Reason", "why the message was given up"),
            ("Volumed-Subject", "the subject it was published to"),
            ("Volumed-Stream-Seq", "its sequence in its stream"),
            ("Volumed-Deliveries", "how often it was delivered"),
        )
    },
}


def public_types() -> list[type]:
    """The message types users see, in a stable order: commands, the event, the queries'
    requests and replies."""
    found: list[type] = [*COMMAND_TYPES.values(), OperationEvent]
    for q in API_QUERIES:
        found += [q.request, q.reply]
    return found


def _internal_types() -> list[type]:
    return [
        t
        for i in INTERNAL
        for t in (i.message, i.reply)
        if isinstance(t, type) and issubclass(t, msgspec.Struct)
    ]


def _stream_of(address: str) -> str | None:
    """The JetStream stream that captures ``address`` ({param}s are single tokens)."""
    tokens = [("*" if t.startswith("{") else t) for t in address.split(".")]
    for stream in TOPOLOGY.streams:
        for pattern in stream.subjects:
            if _matches(pattern.split("."), tokens):
                return stream.name
    return None


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    for i, p in enumerate(pattern):
        if p == ">":
            return len(tokens) > i
        if i >= len(tokens) or (p != "*" and p != tokens[i]):
            return False
    return len(pattern) == len(tokens)


def _params(address: str) -> dict[str, Any]:
    names = [t[1:-1] for t in address.split(".") if t.startswith("{")]
    return {name: {"description": f"the {name.replace('_', ' ')}"} for name in names}


def _channel(
    address: str | None, messages: dict[str, str], summary: str, *, internal: bool
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "messages": {key: {"$ref": f"#/components/messages/{m}"} for key, m in messages.items()},
        "description": summary,
        "tags": [{"name": "internal" if internal else "public"}],
    }
    if address is not None:
        if params := _params(address):
            channel["parameters"] = params
        if stream := _stream_of(address):
            channel["x-jetstream-stream"] = stream
    return channel


def _message(name: str, summary: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": payload,
    }


def _summary(t: type) -> str:
    doc = (t.__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else t.__name__


def _op(action: str, channel: str, messages: list[str], summary: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
        "summary": summary,
    }


def asyncapi() -> dict[str, Any]:
    structs = public_types() + [t for t in _internal_types() if t not in public_types()]
    _, schemas = msgspec.json.schema_components(structs, ref_template=_REF)
    schemas["ErrorCode"] = {
        "type": "string",
        "enum": list(get_args(ErrorCode)),
        "description": "error.code of a failed or rejected event (contract §3), stable strings",
    }
    schemas["JetStreamAck"] = _PUB_ACK
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def message_of(t: type) -> str:
        messages[t.__name__] = _message(
            t.__name__, _summary(t), {"$ref": _REF.format(name=t.__name__)}
        )
        return t.__name__

    messages["JetStreamAck"] = _message(
        "JetStreamAck", "the command is stored", {"$ref": _REF.format(name="JetStreamAck")}
    )
    channels["command_ack"] = _channel(
        None,
        {"JetStreamAck": "JetStreamAck"},
        "the publisher's inbox, when a command is sent as a request (nats req)",
        internal=False,
    )
    for op_type, command in COMMAND_TYPES.items():
        name = message_of(command)
        messages[name]["headers"] = {
            "type": "object",
            "properties": {
                "Nats-Msg-Id": {
                    "type": "string",
                    "description": "the operation id when the body has none",
                }
            },
        }
        messages[name]["description"] = (
            f"Unknown fields are ignored; a body over {MAX_COMMAND_BYTES} bytes, or one this "
            "schema refuses, gets one `rejected` event with `invalid_request`. An integer is "
            "written without a fraction or exponent (1073741824, not 1073741824.0), which "
            "JSON Schema alone would allow."
        )
        channel = f"command_{op_type}"
        channels[channel] = _channel(
            command_subject(op_type), {name: name}, f"{op_type} commands", internal=False
        )
        operations[f"receive_{op_type}"] = _op("receive", channel, [name], f"{op_type} a volume")
        operations[f"receive_{op_type}"]["reply"] = {
            "channel": {"$ref": "#/channels/command_ack"},
            "messages": [{"$ref": "#/channels/command_ack/messages/JetStreamAck"}],
        }
    if "cancel" in COMMAND_TYPES:
        operations["receive_cancel"]["summary"] = "cancel an operation not yet executing"

    event = message_of(OperationEvent)
    channels["events"] = _channel(
        event_subject("{operation_id}"),
        {event: event},
        "each operation's progress: pending, executing, then exactly one terminal event "
        "(completed, failed, cancelled), or one rejected event",
        internal=False,
    )
    operations["send_event"] = _op("send", "events", [event], "publish an operation's progress")

    for code, why in SERVICE_ERRORS.items():
        messages[f"ServiceError{code}"] = {
            "name": f"ServiceError{code}",
            "title": f"micro service error {code}",
            "summary": why,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Service-Error-Code": {"type": "string", "const": code},
                    "Nats-Service-Error": {"type": "string", "description": "what happened"},
                },
                "required": ["Nats-Service-Error-Code", "Nats-Service-Error"],
            },
            "payload": {"description": "empty"},
        }
    for q in API_QUERIES:
        request, reply = message_of(q.request), message_of(q.reply)
        errors = [f"ServiceError{code}" for code in q.errors]
        channel = f"api_{q.name}"
        channels[channel] = _channel(
            q.subject,
            {request: request},
            f"{q.summary} (micro service `volumed`, endpoint {q.name})",
            internal=False,
        )
        channels[f"{channel}_reply"] = _channel(
            None,
            {m: m for m in [reply, *errors]},
            f"the requester's inbox: the {q.name} reply, or an error",
            internal=False,
        )
        operations[f"answer_{q.name}"] = _op("receive", channel, [request], q.summary)
        operations[f"answer_{q.name}"]["reply"] = {
            "channel": {"$ref": f"#/channels/{channel}_reply"},
            "messages": [
                {"$ref": f"#/channels/{channel}_reply/messages/{m}"} for m in [reply, *errors]
            ],
        }

    for i in INTERNAL:
        if i.message is not None:
            name = message_of(i.message)
        elif i.channel == "dead_letters":
            name = "DeadLetter"
            messages[name] = _message(name, i.summary, {"description": "the message as it was"})
            messages[name]["headers"] = _DEAD_LETTER_HEADERS
        else:
            name = f"{i.channel}_request"
            messages[name] = _message(name, "request", _ANY_OBJECT)
        summary = f"{i.sender} → {i.receiver}: {i.summary}"
        channels[i.channel] = _channel(i.address, {name: name}, summary, internal=True)
        op = _op("send", i.channel, [name], summary)
        op["tags"] = [{"name": "internal"}]
        if i.reply is not None:
            if isinstance(i.reply, dict):
                reply = f"{i.channel}_reply"
                messages[reply] = _message(reply, "reply", i.reply)
            else:
                reply = message_of(i.reply)
            channels[f"{i.channel}_reply"] = _channel(
                None, {reply: reply}, "the requester's inbox", internal=True
            )
            op["reply"] = {
                "channel": {"$ref": f"#/channels/{i.channel}_reply"},
                "messages": [{"$ref": f"#/channels/{i.channel}_reply/messages/{reply}"}],
            }
        operations[f"internal_{i.channel}"] = op

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "volumed",
            "version": "1",
            "description": "volumed's NATS API (contract §2-§4; docs/architecture.md). "
            "Operations are volumed's own: it receives commands and queries and sends events; "
            "a client does the opposite. Channels tagged `internal` are between volumed's "
            "actors and may change without notice. Generated from schemas/ and "
            f"bus/topology.py: `{REGENERATE}`.",
            "tags": [
                {"name": "public", "description": "the contract: commands, events, queries"},
                {"name": "internal", "description": "between volumed's actors; not for users"},
            ],
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "VOLUMED_NATS_URL (default nats://127.0.0.1:4222), with "
                "JetStream enabled",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def json_schema(t: type) -> dict[str, Any]:
    """A standalone JSON Schema (2020-12) of one type: its definition at the root, the
    types it refers to under $defs."""
    found = msgspec.json.schema(t)
    defs: dict[str, Any] = found.pop("$defs", {})
    root: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, **defs.pop(t.__name__, found)}
    if defs:
        root["$defs"] = defs
    return root


def _text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def documents() -> dict[str, str]:
    """Every generated file, by its path under docs/, as it is checked in."""
    files = {ASYNCAPI_FILE: _text(asyncapi())}
    for t in public_types():
        files[f"{SCHEMAS_DIR}/{t.__name__}.json"] = _text(json_schema(t))
    return files


def write(docs: Path) -> list[Path]:
    """Write the documents under ``docs`` and remove schema files no type makes any more."""
    files = documents()
    (docs / SCHEMAS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (docs / SCHEMAS_DIR).glob("*.json"):
        if f"{SCHEMAS_DIR}/{stale.name}" not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        path = docs / name
        path.write_text(text)
        written.append(path)
    return written


def main() -> None:
    docs = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs"
    for path in write(docs):
        print(path)


if __name__ == "__main__":
    main()
