"""The error roots (issue 16): every executor error carries a contract code and a message
under one base, and every bus error is a BusError."""

from __future__ import annotations

from typing import get_args

from actors.executor.cloudstack import CloudStackError
from actors.executor.errors import OperationError
from actors.executor.operations import OperationFailed
from actors.persistence.api import Api
from bus import BusError, Conflict, LeaseLost
from bus.kv import Conflict as KvConflict
from bus.lease import LeaseLost as LeaseLeaseLost
from bus.topology import API_PREFIX, API_QUERIES, api_subject
from schemas.common import ErrorCode


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
    assert tuple(served) == API_QUERIES
    assert {subject for subject, _ in served.values()} == {f"{API_PREFIX}.{q}" for q in API_QUERIES}
    assert api_subject("mapping") == "volume.api.mapping"
