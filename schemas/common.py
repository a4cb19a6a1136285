"""Types and helpers shared by every message module."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal, get_args

from msgspec import Meta

OpType = Literal["create", "attach", "detach", "delete", "cancel", "resize"]
Status = Literal["pending", "executing", "completed", "failed", "cancelled", "rejected"]
ErrorCode = Literal[
    "invalid_request",
    "not_found",
    "conflict",
    "unauthorized",
    "cloudstack_unavailable",
    "cloudstack_error",
    "device_timeout",
    "ambiguous_device",
    "not_cancellable",
    "internal",
]

OP_TYPES: tuple[OpType, ...] = get_args(OpType)  # every list of operation types is this


def op_type_of(name: str) -> OpType:
    """``name`` as an operation type; ValueError if it names none."""
    if name not in OP_TYPES:
        raise ValueError(f"unknown operation type {name!r}")
    return name


TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "rejected"})

# Forward-only status order: a record never moves to a lower rank.
STATUS_RANK: dict[str, int] = {
    "pending": 0,
    "executing": 1,
    "completed": 2,
    "failed": 2,
    "cancelled": 2,
    "rejected": 2,
}

OPERATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_OPERATION_ID_RE = re.compile(OPERATION_ID_PATTERN)

OperationId = Annotated[
    str,
    Meta(pattern=OPERATION_ID_PATTERN, description="1 to 64 characters of A-Z a-z 0-9 _ -"),
]
# CloudStack ids are uuids (or numbers on old installs); anything else can only be a typo,
# and characters such as '~' or spaces would also break the cs client's request signature.
CloudStackId = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="a CloudStack id"),
]
# '~' is excluded because the cs client leaves it unencoded while CloudStack's Java side
# encodes it, so the request signature would never match.
VolumeName = Annotated[
    str,
    Meta(pattern=r"^[^~\x00-\x1f\x7f]{1,255}$", description="printable, no ~"),
]

GIB = 1024**3


def is_operation_id(value: object) -> bool:
    """Whether ``value`` (of any type: it may come from a body as received) is an id."""
    return isinstance(value, str) and _OPERATION_ID_RE.fullmatch(value) is not None


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with microseconds and a 'Z' suffix."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_of(value: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 / ISO 8601 time (ours, with 'Z', or
    CloudStack's, with '+0000'); None if it is not one. The one time parser of volumed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def serial_of(volume_id: str) -> str:
    """The disk serial CloudStack gives a volume on KVM: its id without dashes, 20 chars."""
    return volume_id.replace("-", "")[:20]


_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_ID_WORDS = "a CloudStack id: letters, digits, '.', '_' and '-'"


def explain_validation_error(
    msgspec_error: str, *, what: str = "body", pattern_words: dict[str, str] | None = None
) -> str:
    """msgspec's "Expected X - at `$.field`" as "field: <the reason in words>".

    ``what`` names the whole document ("the command body"); ``pattern_words`` says in words
    what a field's regex pattern allows (an id pattern by default)."""
    message, sep, where = msgspec_error.rpartition(" - at `")
    if not sep:
        message, where = msgspec_error, "$`"
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    prefix = f"{path}." if path else ""
    if m := _MISSING_FIELD.match(message):
        return f"{prefix}{m['field']}: this field is required"
    if m := _UNKNOWN_FIELD.match(message):
        return f"{prefix}{m['field']}: unknown field"
    if not path:
        if message.startswith("Expected `object`"):
            return f"the {what} must be a JSON object"
        return message
    field = path.split(".")[0].split("[")[0]
    if "matching regex" in message:
        words = (pattern_words or {}).get(field, _ID_WORDS)
        return f"{path}: must be {words}"
    return f"{path}: {message[0].lower()}{message[1:]}"
