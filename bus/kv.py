"""A typed view of one JetStream KV bucket, values as msgspec Structs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.errors import Conflict as Conflict  # defined with the other bus errors
from bus.refusals import StoreRefusals

T = TypeVar("T")
R = TypeVar("R")

_PASSES = 3  # listings of a bucket whose key count keeps changing, before taking their union
_INFO_TIMEOUT = 30.0  # a page of 100,000 subjects is a few MB


class _StreamState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _StreamInfo(msgspec.Struct):
    state: _StreamState = msgspec.field(default_factory=_StreamState)
    total: int = 0
    error: dict[str, Any] | None = None


class _SubjectsPage(NamedTuple):
    subjects: list[str]
    total: int


_info_decoder = msgspec.json.Decoder(_StreamInfo)
_encode_json = msgspec.json.Encoder().encode


class Bucket(Generic[T]):
    """get/create/update with revisions, so that writers can compare-and-set."""

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        kv: KeyValue,
        value_type: type[T],
        *,
        refusals: StoreRefusals | None = None,
    ) -> None:
        self._js = js
        self._name = name
        self._kv = kv
        self._refusals = refusals
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(value_type)

    async def get(self, key: str) -> tuple[T, int] | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return self._decoder.decode(entry.value), entry.revision

    async def create(self, key: str, value: T) -> int:
        """Store ``value`` only if ``key`` does not exist; raise Conflict otherwise."""
        encoded = self._encoder.encode(value)
        return await self._write(key, _compare_and_set(key, self._kv.create(key, encoded)))

    async def update(self, key: str, value: T, revision: int) -> int:
        """Store ``value`` only if ``key`` is still at ``revision``; raise Conflict otherwise."""
        encoded = self._encoder.encode(value)
        write = _compare_and_set(key, self._kv.update(key, encoded, last=revision))
        return await self._write(key, write)

    async def put(self, key: str, value: T) -> int:
        return await self._write(key, self._kv.put(key, self._encoder.encode(value)))

    async def delete(self, key: str, revision: int | None = None) -> None:
        """Remove ``key`` (idempotent: deleting a missing key is no error); with
        ``revision``, only if it is still at that revision (else Conflict)."""
        await self._write(key, _compare_and_set(key, self._kv.delete(key, last=revision)))

    async def delete_unconfirmed(self, key: str, revision: int) -> None:
        """Remove ``key`` if it is still at ``revision``, without waiting for the server's
        answer: one message instead of a request and its reply. Only for a key whose removal
        nobody waits for, and whose staying (the request lost, or the key moved on) is
        harmless, e.g. one that expires by itself (a released lease)."""
        headers = {"KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": str(revision)}
        await self._js._nc.publish(f"{self._kv._pre}{key}", b"", headers=headers)

    async def _write(self, key: str, write: Awaitable[R]) -> R:
        """A write, with the refusals for want of room noted (for health)."""
        place = f"$KV.{self._name}"
        try:
            result = await write
        except Conflict:
            raise  # the bucket took the request: not a refusal for want of room
        except Exception as e:
            if self._refusals is not None:
                self._refusals.refused(place, f"{place}.{key}", e)
            raise
        if self._refusals is not None:
            self._refusals.stored(place)
        return result

    async def keys(self) -> list[str]:
        """Keys that have a value (deleted or expired ones may still be listed: get() says).

        Read from the bucket's stream state: nats-py's KV keys() can return a partial or
        empty list while keys exist (nats-io/nats.py#842). One stream-info reply lists at
        most 100,000 subjects (the server's limit) and nats-py does not page it, so the
        pages are asked for here, by offset, until the total the server reports is read.
        A pass during which the total changed (keys added or expired) is read again, so
        that a key present throughout is never skipped by a shifted offset."""
        prefix = f"$KV.{self._name}."
        found: set[str] = set()
        for _ in range(_PASSES):
            offset, totals = 0, set()
            while True:
                page = await self._stream_subjects(f"{prefix}>", offset)
                found.update(s.removeprefix(prefix) for s in page.subjects if s.startswith(prefix))
                totals.add(page.total)
                offset += len(page.subjects)
                if not page.subjects or offset >= page.total:
                    break
            if len(totals) == 1:
                break
        return sorted(found)

    async def _stream_subjects(self, subjects_filter: str, offset: int) -> _SubjectsPage:
        request = _encode_json({"subjects_filter": subjects_filter, "offset": offset})
        # The JetStream API directly: nats-py's stream_info() sends no offset.
        reply = await self._js._nc.request(
            f"{self._js._prefix}.STREAM.INFO.KV_{self._name}", request, timeout=_INFO_TIMEOUT
        )
        info = _info_decoder.decode(reply.data)
        if info.error is not None:
            raise RuntimeError(f"stream info of bucket {self._name}: {info.error}")
        subjects = info.state.subjects or {}
        # A server that does not page (one reply) reports no total.
        return _SubjectsPage(list(subjects), info.total if info.total else len(subjects))

    async def items(self) -> AsyncIterator[tuple[str, T]]:
        for key in await self.keys():
            got = await self.get(key)
            if got is not None:
                yield key, got[0]


def is_wrong_last_sequence(e: Exception) -> bool:
    """The server refused a compare-and-set write: the subject moved on (JetStream 10071).
    nats-py raises KeyWrongLastSequenceError, or a plain APIError on some servers."""
    return (
        isinstance(e, KeyWrongLastSequenceError)
        or getattr(e, "err_code", None) == 10071
        or "wrong last sequence" in str(e)
    )


async def _compare_and_set(key: str, write: Awaitable[R]) -> R:
    try:
        return await write
    except Exception as e:
        if is_wrong_last_sequence(e):
            raise Conflict(key) from e
        raise
