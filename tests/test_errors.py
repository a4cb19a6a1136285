"""The error roots (issue 16): every executor error carries a contract code and a message
under one base, and every bus error is a BusError."""

from __future__ import annotations

from typing import get_args

import pytest

from actors.executor.cloudstack import CloudStackError
from actors.executor.errors import OperationError
from actors.executor.operations import OperationFailed
from actors.persistence.api import Api, endpoints_of
from bus import BusError, Conflict, LeaseLost
from bus.kv import Conflict as KvConflict
from bus.lease import LeaseLost as LeaseLeaseLost
from bus.topology import API_MAPPING, API_PREFIX, API_QUERIES, QuerySpec, api_subject
from schemas.common import ErrorCode
from schemas.queries import Health, HealthQuery


def test_every_executor_error_carries_code_and_message() -> None:
    errors = [
        OperationError("internal", "plain"),
        CloudStackError("cloudstack_unavailable", "down", transient=True),
        OperationFailed("device_timeout", "no device", volume_id="v", vm_id="m", attached=True),
    ]
    for e in errors:
        assert isinstance(e, OperationError)
        assert e.code in get_args(ErrorCode)
        assert e.message and str(e) == e.message
    cs, failed = errors[1], errors[2]
    assert isinstance(cs, CloudStackError) and cs.transient and not cs.maybe_applied
    assert isinstance(failed, OperationFailed)
    assert (failed.volume_id, failed.vm_id, failed.attached) == ("v", "m", True)


def test_bus_errors_share_one_root() -> None:
    assert KvConflict is Conflict and LeaseLeaseLost is LeaseLost  # the old import paths
    assert issubclass(Conflict, BusError) and issubclass(LeaseLost, BusError)
    assert not issubclass(Conflict, LeaseLost) and not issubclass(LeaseLost, Conflict)


def test_query_subjects_come_from_the_topology() -> None:
    served = Api.__new__(Api).endpoints()  # listing them needs no store
    names = tuple(q.name for q in API_QUERIES)
    assert tuple(served) == names
    assert {subject for subject, _ in served.values()} == {f"{API_PREFIX}.{n}" for n in names}
    assert api_subject("mapping") == API_MAPPING.subject == "volume.api.mapping"


def test_a_query_without_handler_or_declaration_stops_the_service() -> None:
    """The served queries are exactly the declared ones: persistence cannot start otherwise."""
    api = Api.__new__(Api)

    async def handler(body: bytes) -> None: ...

    every = [(q, handler) for q in API_QUERIES]
    assert list(endpoints_of(*every)) == [q.name for q in API_QUERIES]
    with pytest.raises(RuntimeError, match=r"without a handler \['health'\]"):
        endpoints_of(*every[:-1])
    stray = QuerySpec("stray", HealthQuery, Health, "not declared")
    with pytest.raises(RuntimeError, match=r"not declared \['stray'\]"):
        endpoints_of(*every, (stray, handler))
    with pytest.raises(RuntimeError, match=r"answered twice \['mapping'\]"):
        endpoints_of(*every, (API_MAPPING, handler))
    assert set(api.endpoints()) == {q.name for q in API_QUERIES}
