"""Configuration (contract §1): defaults, TOML, environment precedence, secrets kept out."""

from __future__ import annotations

import logging
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from actors.logs import SecretFilter
from schemas.config import ConfigError, load_settings
from tests.conftest import free_port, nats_server_binary

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_contracts() -> None:
    s = load_settings(environ={})
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.db_dsn == "mysql://root@127.0.0.1:3306/volumed"
    assert s.sysfs == "/sys" and s.dev == "/dev"
    assert s.devices == ("vd*", "sd*", "xvd*", "nvme*n*")
    assert s.poll_interval == 2 and s.correlation_timeout == 30
    assert s.cloudstack_endpoint is None and s.vm_id is None


def test_toml_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "volumed.toml"
    f.write_text(
        'nats_url = "nats://a:1"\npoll_interval = 0.5\ndevices = ["loop*"]\n'
        'cloudstack_endpoint = "http://toml/client/api"\nvm_id = "vm-toml"\n'
    )
    s = load_settings(
        str(f),
        environ={
            "VOLUMED_VM_ID": "vm-env",
            "CLOUDSTACK_ENDPOINT": "http://env/client/api",
            "VOLUMED_DEVICES": "vd*,sd*",
        },
    )
    assert s.nats_url == "nats://a:1" and s.poll_interval == 0.5
    assert s.vm_id == "vm-env" and s.cloudstack_endpoint == "http://env/client/api"
    assert s.devices == ("vd*", "sd*")


def test_bad_values_name_the_key_not_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="poll_interval"):
        load_settings(environ={"VOLUMED_POLL_INTERVAL": "-1"})
    f = tmp_path / "bad.toml"
    f.write_text('no_such_key = 1\ncloudstack_secret = "s3cr3t-value"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(str(f), environ={})
    assert "no_such_key" in str(e.value) and "s3cr3t-value" not in str(e.value)


@pytest.mark.parametrize("value", ["localhost", "abc", ":99999", "127.0.0.1:-1", " "])
def test_a_bad_listen_address_is_explained_in_words(value: str) -> None:
    """Tried from outside: VOLUMED_HTTP_ADDR=localhost answered with msgspec's regex."""
    for name in ("VOLUMED_HTTP_ADDR", "VOLUMED_METRICS_ADDR"):
        with pytest.raises(ConfigError) as bad:
            load_settings(environ={name: value})
        assert f"{name} (" in str(bad.value) and "host:port" in str(bad.value)
        assert "regex" not in str(bad.value)


def test_secrets_are_masked_in_repr_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(
        environ={
            "CLOUDSTACK_SECRET": "cs-secret-123",
            "VOLUMED_DB_DSN": "mysql://u:db-pass-456@h:3306/d",
        }
    )
    text = repr(s) + str(s) + str(s.redacted())
    assert "cs-secret-123" not in text and "db-pass-456" not in text
    assert set(s.secrets()) == {"cs-secret-123", "db-pass-456"}
    f = SecretFilter()
    f.add(*s.secrets())
    logger = logging.getLogger("volumed.test.secrets")
    logger.addFilter(f)
    with caplog.at_level(logging.INFO, logger="volumed.test.secrets"):
        logger.info("connecting with %s and %s", "cs-secret-123", s.db_dsn)
    assert "cs-secret-123" not in caplog.text and "db-pass-456" not in caplog.text
    assert "***" in caplog.text


def test_nats_conf_starts_a_jetstream_server(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(ROOT / "nats.conf"), "-p", str(port), "-m", str(http)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/jsz", timeout=1) as r:
                    assert b"config" in r.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
