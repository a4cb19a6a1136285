"""Log lines (VOLUMED_LOG_FORMAT): one JSON object per line from a real `volumed run`, each
naming its actor and, where known, its operation and volume; secrets masked in both formats;
and the same process's /metrics endpoint."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from actors.logs import SECRETS, RepeatFilter, bind, setup_logging
from simulator import Fault, SimConfig, Simulator
from tests.conftest import Database, NatsServer, VolumedProcess, free_port, volumed_env, wait_for
from tests.test_lifecycle import create_body, op, remote_vm


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging changes the process's root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def test_both_formats_name_the_operation_and_mask_secrets(
    tmp_path: Path, root_logging: None
) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    SECRETS.add(secret)
    log = logging.getLogger("volumed.executor.test")
    for fmt in ("json", "text"):
        path = tmp_path / f"volumed.{fmt}.log"
        setup_logging("INFO", path=str(path), log_format=fmt)  # type: ignore[arg-type]
        log.info("calling with %s", secret, extra={"operation_id": "op-1", "volume_id": "v-1"})
        log.warning("no ids here")
        logging.getLogger().handlers[0].flush()
        lines = path.read_text().splitlines()
        assert len(lines) == 2, lines
        assert secret not in path.read_text()
        if fmt == "json":
            first, second = map(json.loads, lines)
            assert first["operation_id"] == "op-1" and first["volume_id"] == "v-1"
            assert first["actor"] == "executor" and first["level"] == "INFO"
            assert first["message"] == "calling with ***"
            assert first["time"].endswith("Z")
            assert second["operation_id"] is None and second["level"] == "WARNING"
        else:
            assert lines[0].endswith("calling with *** [op=op-1 volume=v-1]"), lines[0]
            assert lines[1].endswith("volumed.executor.test: no ids here"), lines[1]


async def test_bound_ids_reach_lines_of_lower_layers(tmp_path: Path, root_logging: None) -> None:
    """What a task binds (the executor binds its operation) names the lines logged below
    it, by modules that do not know the operation."""
    import asyncio

    path = tmp_path / "volumed.log"
    setup_logging("INFO", path=str(path), log_format="json")

    async def operation() -> None:
        bind(actor="executor", operation_id="op-2", volume_id="v-2")
        logging.getLogger("volumed.bus.consumer").info("deep down")

    await asyncio.create_task(operation())
    logging.getLogger("volumed.bus.consumer").info("outside the task")
    logging.getLogger().handlers[0].flush()
    inside, outside = map(json.loads, path.read_text().splitlines())
    assert (inside["actor"], inside["operation_id"], inside["volume_id"]) == (
        "executor",
        "op-2",
        "v-2",
    )
    assert outside["operation_id"] is None and outside["actor"] is None


async def test_volumed_run_logs_json_lines_with_the_operation_and_serves_metrics(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    async with Simulator(SimConfig(seed=11)) as sim:
        port = free_port()
        log_path = tmp_path / "volumed.log"
        process = VolumedProcess(
            volumed_env(
                nats_server.url,
                database.dsn,
                sim,
                VOLUMED_LOG_FORMAT="json",
                VOLUMED_METRICS_ADDR=f"127.0.0.1:{port}",
            ),
            ("executor", "persistence"),
            log_path=log_path,
        )
        await process.start()
        from bus import Bus

        user = await Bus.connect(nats_server.url, "test-user")
        events: dict[str, list[dict[str, object]]] = {}

        async def on_event(subject: str, data: bytes, reply: str | None) -> None:
            event = json.loads(data)
            events.setdefault(event["operation_id"], []).append(event)

        await user.subscribe("volume.events.>", on_event)

        def ended(op_id: str) -> dict[str, object] | None:
            return next(
                (e for e in events.get(op_id, []) if e["status"] in ("completed", "failed")), None
            )

        metrics_url = f"http://127.0.0.1:{port}/metrics"

        async def scrape() -> str | None:
            try:
                async with aiohttp.ClientSession() as http, http.get(metrics_url) as reply:
                    return await reply.text() if reply.status == 200 else None
            except aiohttp.ClientError:
                return None

        try:
            # The endpoint is served once the streams exist, before the actors start.
            await wait_for(scrape, 30, interval=0.1)
            c = op()
            await user.publish("volume.cmd.create", create_body(sim, c, "logged"))
            created = await wait_for(lambda: ended(c), 30)
            assert created["status"] == "completed", created
            volume_id = str(created["volume_id"])
            # One transient failure: the executor logs it, naming the operation.
            sim.inject(Fault(kind="http", command="attachVolume", status=503, count=1))
            a = op()
            await user.publish(
                "volume.cmd.attach",
                {"operation_id": a, "volume_id": volume_id, "vm_id": remote_vm(sim)},
            )
            assert (await wait_for(lambda: ended(a), 30))["status"] == "completed"

            counted = 'volumed_operations_total{code="",status="completed",type="attach"} 1.0'

            async def scrape_counted() -> str | None:
                text = await scrape()
                return text if text and counted in text else None

            metrics = await wait_for(scrape_counted)
            assert "volumed_cloudstack_retries_total 1.0" in metrics
        finally:
            await user.close()
            assert await process.stop() == 0

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all(
        {"time", "level", "actor", "operation_id", "volume_id", "message"} <= set(x) for x in lines
    )
    retried = [x for x in lines if "transient CloudStack failure" in x["message"]]
    assert len(retried) == 1, retried
    assert retried[0]["operation_id"] == a and retried[0]["volume_id"] == volume_id
    assert retried[0]["actor"] == "executor"
    for secret in (sim.secret_key,):
        assert secret not in text and secret not in metrics


def test_one_cause_is_one_line_until_it_repeats_past_the_window() -> None:
    """A line repeated within the window (NATS reconnect attempts, the same error from
    every actor) is dropped; the next one after it counts those dropped."""
    repeat = RepeatFilter(window=10.0)

    def record(message: str, at: float, name: str = "volumed.bus") -> logging.LogRecord:
        r = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
        r.created = at
        return r

    first = record("nats error: connect call failed", 100.0)
    assert repeat.filter(first)
    for at, name in ((100.5, "volumed.bus"), (101.0, "volumed.correlator"), (105.0, "volumed.bus")):
        assert not repeat.filter(record("nats error: connect call failed", at, name))
    # Another line, and the same text at another level, are other causes.
    assert repeat.filter(record("nats reconnected", 106.0))
    info = record("nats error: connect call failed", 106.0)
    info.levelno = logging.INFO
    assert repeat.filter(info)
    later = record("nats error: connect call failed", 111.0)
    assert repeat.filter(later)
    assert later.getMessage() == (
        "nats error: connect call failed (and 3 more times in the last 11 s)"
    )
    assert not repeat.filter(record("nats error: connect call failed", 112.0))
