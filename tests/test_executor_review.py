"""Findings of a review of the executor, each shown with real NATS: the serial-less attach
gate is opened per host, not per process."""

from __future__ import annotations

from actors.executor import ExecutorActor
from bus import Bus
from bus.topology import TOPOLOGY
from schemas.config import Settings
from tests.conftest import NatsServer


async def test_serials_shown_on_a_host_open_its_gate_in_every_process(
    nats_server: NatsServer,
) -> None:
    """An attach proven by serial in one executor process opens the host's gate for the
    others too (they never ran an attach to it); a later proof by exclusion, in any process,
    closes it for all."""
    bus = await Bus.connect(nats_server.url, "gate")
    try:
        await bus.provision(TOPOLOGY)
        one, two = (
            ExecutorActor(bus, Settings(nats_url=nats_server.url), name) for name in ("1", "2")
        )
        await one.open()
        await two.open()
        assert not await two.serials_shown("vm-1")
        await one.note_proof("vm-1", "serial", "op-1")
        assert await two.serials_shown("vm-1")
        assert not await two.serials_shown("vm-2")  # per host
        await two.note_proof("vm-1", "exclusion", "op-2")
        assert not await one.serials_shown("vm-1")
    finally:
        await bus.close()
