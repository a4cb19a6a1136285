"""An executor whose clock is hours off CloudStack's still talks to it (issue 13, "Clocks").

`volumed run executor` runs under Debian's faketime, 3 h behind and 3 h ahead of the
simulator (which keeps the real clock, as CloudStack would). Behind, a signature whose
``expires`` is counted on this host's clock has expired on CloudStack's before it is sent;
ahead, a lost createVolume answer is looked up among the volumes "created around the time it
was sent", which on this host's clock is 3 h away from CloudStack's ``created``. Both must be
read on CloudStack's clock, learned from the Date header of its answers: every create
completes, and the lost answer is recognised (one createVolume, no orphan).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from schemas.common import GIB
from simulator import Fault, SimConfig, Simulator
from tests.conftest import Database, NatsServer, VolumedProcess, skewed_clock, volumed_env, wait_for
from tests.test_order_clocks import _executors_beat

TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})


@pytest.mark.parametrize("skew", ["-3h", "+3h"])
async def test_an_executor_hours_off_cloudstack_creates_once(
    nats_server: NatsServer, database: Database, tmp_path: Path, skew: str
) -> None:
    async with Simulator(SimConfig(seed=7, job_latency=0.02)) as sim:
        executor = VolumedProcess(
            volumed_env(
                nats_server.url,
                database.dsn,
                sim,
                **skewed_clock(skew),
                VOLUMED_HEARTBEAT_INTERVAL="0.5",
            ),
            # Persistence too: a create whose answer was lost asks it which other creates
            # are in doubt before it takes the volume it finds.
            ("persistence", "executor"),
            log_path=tmp_path / "executor.log",
        )
        bus = await Bus.connect(nats_server.url, "cloudstack-clock-test")
        ended: dict[str, dict[str, Any]] = {}

        async def on_event(_subject: str, data: bytes, _reply: str | None) -> None:
            event = json.loads(data)
            if event.get("status") in TERMINAL:
                ended.setdefault(event["operation_id"], event)

        run = uuid.uuid4().hex[:6]

        async def create(name: str) -> dict[str, Any]:
            op_id = f"{run}-{name}"
            body = {
                "operation_id": op_id,
                "name": name,
                "size": GIB,
                "disk_offering_id": sim.disk_offering_ids[0],
                "zone_id": sim.zone_id,
            }
            await bus.publish("volume.cmd.create", body)
            await wait_for(lambda: op_id in ended, timeout=30, interval=0.05)
            return ended[op_id]

        try:
            await bus.subscribe("volume.events.>", on_event)
            await executor.start()
            await wait_for(lambda: _executors_beat(bus, 1), timeout=30, interval=0.1)
            # The first request of the process knows nothing of CloudStack's clock yet.
            first = await create(f"{run}-first")
            assert first["status"] == "completed", first
            # The volume is made, its answer lost: found again, not created twice.
            sim.inject(Fault(kind="accept_then_drop", command="createVolume"))
            lost = await create(f"{run}-lost")
            assert lost["status"] == "completed", lost
            for name, event in ((f"{run}-first", first), (f"{run}-lost", lost)):
                sent = [c for c in sim.calls if c.matches("createVolume", {"name": name})]
                made = [v.id for v in sim.volumes.values() if v.name == name]
                assert (len(sent), made) == (1, [event["volume_id"]]), (name, sent)
            refused = [c for c in sim.calls if c.status == 401]
            assert len(refused) <= 1, refused  # at most the first, before any answer
        finally:
            await bus.close()
            await executor.stop()
