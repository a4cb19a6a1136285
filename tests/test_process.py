"""`volumed run` as a real process: it serves, and SIGTERM/SIGINT end it with status 0."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from bus import Bus
from simulator import SimConfig, Simulator
from tests.conftest import Database, NatsServer, VolumedProcess, volumed_env, wait_for
from tests.test_lifecycle import create_body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_serves_and_exits_0_on_signal(
    nats_server: NatsServer, database: Database, tmp_path: Path, sig: int
) -> None:
    async with Simulator(SimConfig(seed=11)) as sim:
        process = VolumedProcess(
            volumed_env(nats_server.url, database.dsn, sim),
            ("executor", "persistence"),
            log_path=tmp_path / "volumed.log",
        )
        await process.start()
        user = await Bus.connect(nats_server.url, "user")
        try:
            events: list[bytes] = []

            async def on_event(_s: str, data: bytes, _r: str | None) -> None:
                events.append(data)

            await user.subscribe("volume.events.>", on_event)
            op_id = f"p-{uuid.uuid4().hex[:12]}"

            # Published before the process has provisioned: retried until the stream exists.
            async def publish() -> bool:
                try:
                    await user.publish("volume.cmd.create", create_body(sim, op_id, "proc"))
                    return True
                except Exception:
                    return False

            await wait_for(publish, 30, interval=0.2)
            await wait_for(
                lambda: any(b'"completed"' in e and op_id.encode() in e for e in events), 30
            )

            # The row follows the event (the writer batches): ask until it is there.
            async def persisted() -> bool:
                reply = await user.request("volume.api.operation", {"operation_id": op_id})
                return b'"completed"' in reply

            await wait_for(persisted, 10, interval=0.1)
        finally:
            await user.close()
            code = await process.stop(sig)
        assert code == 0, (tmp_path / "volumed.log").read_text()[-3000:]
        log = (tmp_path / "volumed.log").read_text()
        assert sim.secret_key not in log


async def test_unknown_actor_is_a_usage_error(tmp_path: Path) -> None:
    process = VolumedProcess({}, ("nonsense",), log_path=tmp_path / "log")
    await process.start()
    assert await process.wait(timeout=20) == 2


async def test_sigterm_ends_a_volumed_still_waiting(tmp_path: Path) -> None:
    """No NATS at all, and no VM id: volumed waits for both, and SIGTERM still ends it."""
    from tests.conftest import free_port

    env = {"VOLUMED_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    process = VolumedProcess(env, (), log_path=tmp_path / "log")
    await process.start()
    import asyncio

    await asyncio.sleep(1.5)
    assert await process.stop(signal.SIGTERM, timeout=10) == 0


async def test_sigterm_ends_a_watcher_waiting_for_its_vm_id(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {"VOLUMED_NATS_URL": nats_server.url}
    process = VolumedProcess(env, ("watcher", "correlator"), log_path=tmp_path / "log")
    await process.start()
    import asyncio

    await asyncio.sleep(2)
    assert await process.stop(signal.SIGTERM, timeout=10) == 0
    assert "local VM id unknown" in (tmp_path / "log").read_text()
