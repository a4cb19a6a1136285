"""User commands, as published on ``volume.cmd.<type>`` (contract §2).

Unknown fields are ignored (msgspec's default) so that newer clients work with older
daemons; constraints live in the field types so a rejection names the field and the reason.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from schemas.common import (
    GIB,
    OP_TYPES,
    CloudStackId,
    OperationId,
    OpType,
    VolumeName,
    explain_validation_error,
    is_operation_id,
)

# A larger command body is invalid (contract §2); it also keeps what volumed stores about a
# command (record, events) well under the server's max payload (1 MiB by default).
MAX_COMMAND_BYTES = 64 * 1024
# How much of a body that is not kept whole (too large, not JSON) the record and the
# rejected event show.
EXCERPT_BYTES = 1024

MetadataKey = Annotated[str, Meta(min_length=1, max_length=255)]
MetadataValue = Annotated[str, Meta(max_length=4096)]
# A volume's size in bytes: CloudStack sizes volumes in whole GiB. At most the largest whole
# GiB below 2**63: a larger size would pass to CloudStack, and its completed event would then
# not fit the signed 64-bit size of the records and mappings (refused, so the operation's
# record would stay ``executing``).
MAX_VOLUME_SIZE = (2**63 - 1) // GIB * GIB
VolumeSize = Annotated[
    int,
    Meta(
        gt=0,
        le=MAX_VOLUME_SIZE,
        multiple_of=GIB,
        description="bytes, a whole number of GiB (below 2**63)",
    ),
]


class CreateCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    name: VolumeName
    size: VolumeSize
    disk_offering_id: CloudStackId
    zone_id: CloudStackId
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=64)] | None = None


class AttachCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    volume_id: CloudStackId
    vm_id: CloudStackId
    as_root: bool = False


class DetachCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    volume_id: CloudStackId


class DeleteCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    volume_id: CloudStackId


class CancelCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    target: OperationId


class ResizeCommand(Struct, kw_only=True):
    operation_id: OperationId | None = None
    volume_id: CloudStackId
    size: VolumeSize  # the new size
    # A smaller size loses the data beyond it: refused (before any CloudStack call) unless
    # the caller says so.
    shrink_ok: bool = False


Command = (
    CreateCommand | AttachCommand | DetachCommand | DeleteCommand | CancelCommand | ResizeCommand
)

COMMAND_TYPES: dict[OpType, type[Command]] = {
    "create": CreateCommand,
    "attach": AttachCommand,
    "detach": DetachCommand,
    "delete": DeleteCommand,
    "cancel": CancelCommand,
    "resize": ResizeCommand,
}
# One command type per operation type, in OpType's order (subjects, docs, the CLI follow it).
if tuple(COMMAND_TYPES) != OP_TYPES:
    raise TypeError("COMMAND_TYPES must name the operation types of schemas.common.OpType")

# One decoder per command type, built once.
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in COMMAND_TYPES.items()
}


class InvalidCommand(ValueError):
    """The command cannot be accepted; ``str(self)`` names the field and the reason."""


def decode_command(op_type: str, body: bytes) -> Command:
    """Decode and validate a command body, or raise InvalidCommand with a readable reason."""
    decoder = _DECODERS.get(op_type)
    if decoder is None:
        raise InvalidCommand(f"unknown command type {op_type!r}")
    if len(body) > MAX_COMMAND_BYTES:
        raise InvalidCommand(
            f"the command body is {len(body)} bytes; the limit is {MAX_COMMAND_BYTES} bytes "
            "(64 KiB)"
        )
    if not body.strip():
        raise InvalidCommand("the command body is empty: a JSON object was expected")
    try:
        command: Command = decoder.decode(body)
    except msgspec.ValidationError as e:
        raise InvalidCommand(_humanize(str(e))) from None
    except msgspec.DecodeError as e:
        raise InvalidCommand(f"the command body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidCommand("the command body is nested too deeply") from None
    return command


def _json_of(body: bytes) -> Any:
    """The body as plain JSON values, or _NOT_JSON (any body at all: nothing raises)."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        # Malformed, too deep, or numbers out of range.
        return _NOT_JSON


_NOT_JSON = object()


def operation_id_in(body: bytes) -> str | None:
    """The body's ``operation_id`` if it is a valid operation id (whatever the body holds)."""
    parsed = _json_of(body) if len(body) <= 16 * MAX_COMMAND_BYTES else _NOT_JSON
    if isinstance(parsed, dict):
        value = parsed.get("operation_id")
        if is_operation_id(value):
            return str(value)
    return None


def request_of(body: bytes) -> Any:
    """The command as received, for the record and the first event: its JSON when it is
    within the size limit and parses, else the start of its text (bounded)."""
    if len(body) <= MAX_COMMAND_BYTES:
        parsed = _json_of(body)
        if parsed is not _NOT_JSON:
            return parsed
    return body[:EXCERPT_BYTES].decode("utf-8", "replace")


_PATTERN_WORDS = {
    "operation_id": "1 to 64 characters of A-Z a-z 0-9 _ -",
    "target": "an operation id: 1 to 64 characters of A-Z a-z 0-9 _ -",
    "name": "1 to 255 printable characters without '~'",
}


def _humanize(msgspec_error: str) -> str:
    """The reason in words, with the size rule spelled out."""
    text = explain_validation_error(
        msgspec_error, what="command body", pattern_words=_PATTERN_WORDS
    )
    if text.startswith("size: ") and ("multiple of" in text or ">" in text or "<" in text):
        return (
            f"size: must be a positive whole number of GiB, in bytes (a multiple of {GIB}, "
            f"at most {MAX_VOLUME_SIZE})"
        )
    return text


def operation_type_of(command: Command) -> OpType:
    for name, cls in COMMAND_TYPES.items():
        if isinstance(command, cls):
            return name
    raise TypeError(type(command))


def volume_of(command: Command) -> str | None:
    """The volume a command acts on (None for create and cancel): the key of its order lane."""
    if isinstance(command, AttachCommand | DetachCommand | DeleteCommand | ResizeCommand):
        return command.volume_id
    return None
