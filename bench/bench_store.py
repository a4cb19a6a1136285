"""Persistence's own CPU per operation: the store and its database driver, without the bus.

The events of --volumes creates, then as many deletes (pending, executing and the terminal
event, each with its command sequence, each applied as a batch of its own, as one operation
in flight gives), straight into the store in this process, on MariaDB and on SQLite:
`store_<mysql|sqlite>_cpu_<create|delete>_per_op_ms`, this process's user + system CPU per
operation (for SQLite its thread's too). A run against older code needs only this file
copied into its bench/ (it reads the event fields that code knows).

    python -m bench.bench_store [--volumes 300]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from actors.persistence import open_store
from actors.persistence.records import Event, decode_event
from bench.common import database_name, drop_database, figure
from schemas.events import OperationEvent

_START = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
# Older code's events have no seq.
_HAS_SEQ = "seq" in OperationEvent.__struct_fields__


def _event(op: str, type_: str, status: str, n: int, **fields: Any) -> Event:
    at = (_START + dt.timedelta(seconds=n)).isoformat().replace("+00:00", "Z")
    body = {"operation_id": op, "type": type_, "status": status, "at": at, **fields}
    if _HAS_SEQ:
        body["seq"] = n
    return decode_event(f"volume.events.{op}", msgspec.json.encode(body))


def _events(phase: str, volumes: int, first: int) -> list[Event]:
    out = []
    for i in range(volumes):
        n = (first + i) * 3
        volume = {"volume_id": f"vol-{i}"}
        if phase == "create":
            steps: list[tuple[str, dict[str, Any]]] = [
                ("pending", {"request": {"name": f"v{i}", "size": 1 << 30}}),
                ("executing", {}),
                ("completed", {**volume, "response": {"id": f"vol-{i}"}}),
            ]
        else:
            steps = [
                ("pending", volume),
                ("executing", volume),
                ("completed", {**volume, "attached": False}),
            ]
        out += [_event(f"{phase}-{i}", phase, s, n + k, **f) for k, (s, f) in enumerate(steps)]
    return out


async def _run(dsn: str, name: str, volumes: int) -> None:
    store = await open_store(dsn)
    try:
        for k, phase in enumerate(("create", "delete")):
            events = _events(phase, volumes, 1 + k * volumes)
            start = time.process_time()
            for event in events:
                await store.apply([event])
            cpu = time.process_time() - start
            figure(f"store_{name}_cpu_{phase}_per_op_ms", 1000 * cpu / volumes, "ms")
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300, help="creates, then deletes")
    args = parser.parse_args()
    db = database_name()
    try:
        await _run(f"mysql://root@127.0.0.1:3306/{db}", "mysql", args.volumes)
    finally:
        drop_database(db)
    with tempfile.TemporaryDirectory() as tmp:
        await _run(f"sqlite://{Path(tmp) / 'bench.db'}", "sqlite", args.volumes)


if __name__ == "__main__":
    asyncio.run(main())
