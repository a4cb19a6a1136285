"""Bad input tried from outside: a configuration that would watch nothing, and a query whose
id breaks the rules, each answered in the words of what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus import Bus
from schemas.config import ConfigError, Settings, load_settings
from tests.conftest import Database, NatsServer, VolumedProcess, start_volumed, stop_volumed


@pytest.mark.parametrize("value", [",", " , ", "vd*,,sd*", "vd*,"])
def test_an_empty_device_pattern_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="VOLUMED_DEVICES"):
        load_settings(environ={"VOLUMED_DEVICES": value})


def test_an_empty_device_list_in_the_config_file_is_refused_too(tmp_path: Path) -> None:
    f = tmp_path / "volumed.toml"
    f.write_text("devices = []\n")
    with pytest.raises(ConfigError, match="devices"):
        load_settings(str(f), environ={})


async def test_volumed_run_refuses_to_watch_nothing(tmp_path: Path) -> None:
    log = tmp_path / "volumed.log"
    process = VolumedProcess({"VOLUMED_DEVICES": ","}, ("watcher",), log_path=log)
    await process.start()
    try:
        code = await process.wait(timeout=30)
    finally:
        assert process.proc is not None
        if process.proc.returncode is None:  # it started watching nothing
            await process.kill()
    assert code == 2
    assert "VOLUMED_DEVICES" in log.read_text()


async def test_a_bad_operation_id_is_explained_as_an_operation_id(
    nats_server: NatsServer, database: Database
) -> None:
    settings = Settings(nats_url=nats_server.url, db_dsn=database.dsn, instance="bad-input")
    harness, task = await start_volumed(settings, ["persistence"], None)
    bus: Bus = harness.bus  # type: ignore[assignment]
    try:
        for bad in ("a.b", "a b", "x" * 65):
            msg = await bus.nc.request(
                "volume.api.operation", json.dumps({"operation_id": bad}).encode(), timeout=5
            )
            headers = msg.headers or {}
            text = headers.get("Nats-Service-Error", "")
            assert headers.get("Nats-Service-Error-Code") == "400", (bad, headers)
            assert text.startswith("operation_id: must be an operation id"), text
            assert "CloudStack" not in text and "'.'" not in text, text
    finally:
        await stop_volumed(harness, task)
