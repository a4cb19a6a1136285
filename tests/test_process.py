"""`volumed run` as a real process: it serves, and SIGTERM/SIGINT end it with status 0."""

from __future__ import annotations

import asyncio
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
    log = tmp_path / "log"
    process = VolumedProcess(env, (), log_path=log)
    await process.start()
    # Its start-up takes seconds on a busy host: signalled once it is waiting for NATS.
    await wait_for(lambda: "nats error" in log.read_text(), 30, interval=0.05)
    assert await process.stop(signal.SIGTERM, timeout=10) == 0


async def test_sigterm_ends_a_watcher_waiting_for_its_vm_id(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {"VOLUMED_NATS_URL": nats_server.url}
    log = tmp_path / "log"
    process = VolumedProcess(env, ("watcher", "correlator"), log_path=log)
    await process.start()
    await wait_for(lambda: "local VM id unknown" in log.read_text(), 30, interval=0.05)
    assert await process.stop(signal.SIGTERM, timeout=10) == 0


def maps(pid: int, library: str) -> bool:
    """Whether process ``pid`` has loaded ``library`` (Linux: /proc/PID/maps)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_sent_at_spawn_ends_volumed_with_0(
    nats_server: NatsServer, tmp_path: Path, sig: int
) -> None:
    """Sent the moment the process exists, before the interpreter has run any of volumed's
    code. Unblocked, such a signal kills any process by the default action before it can
    install a handler; blocked by the parent, it is still pending at volumed's first line."""
    env = {"VOLUMED_NATS_URL": nats_server.url, "VOLUMED_DB_DSN": f"sqlite:///{tmp_path}/v.db"}
    process = VolumedProcess(env, ("executor", "persistence"), log_path=tmp_path / "log")
    await process.start(signals_blocked=True)
    assert await process.stop(sig, timeout=30) == 0, (tmp_path / "log").read_text()[-3000:]
    assert "during start-up: stopped before connecting" in (tmp_path / "log").read_text()


# (what the process has reached, then seconds more): from its imports to serving.
MOMENTS = [("msgspec", 0.0), ("msgspec", 0.1), ("msgspec", 0.3), ("msgspec", 1.0)]
MOMENTS += [("connecting", 0.0), ("volumed running", 0.0), ("volumed running", 0.5)]


@pytest.mark.parametrize(("reached", "then"), MOMENTS)
async def test_sigterm_at_any_moment_of_start_up_ends_volumed_with_0(
    nats_server: NatsServer, tmp_path: Path, reached: str, then: float
) -> None:
    """`msgspec`: loading its dependencies (seconds on a busy host, before volumed used to
    catch SIGTERM); `connecting`: its settings logged; `volumed running`: all actors up."""
    env = {"VOLUMED_NATS_URL": nats_server.url, "VOLUMED_DB_DSN": f"sqlite:///{tmp_path}/v.db"}
    log = tmp_path / "log"
    process = VolumedProcess(env, ("executor", "persistence"), log_path=log)
    await process.start()
    assert process.proc is not None
    pid = process.proc.pid
    if reached == "msgspec":
        await wait_for(lambda: maps(pid, "msgspec"), 30, interval=0.001)
    elif reached == "connecting":
        await wait_for(lambda: log.exists() and "settings: " in log.read_text(), 30, 0.001)
    else:
        await wait_for(lambda: log.exists() and reached in log.read_text(), 30, 0.001)
    await asyncio.sleep(then)
    assert await process.stop(signal.SIGTERM, timeout=30) == 0, log.read_text()[-3000:]
