"""No secret anywhere (contract §1), whatever its form: URL passwords in the CloudStack
endpoint, in ossea_configs.api_url and in the DSN, tried from outside with `volumed run`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiomysql
import pytest

from bus import Bus
from schemas.config import load_settings, mask_secrets, mask_url_password, split_url, url_secrets
from tests.conftest import (
    MARIADB_HOST,
    MARIADB_PORT,
    Database,
    NatsServer,
    VolumedProcess,
    free_port,
    wait_for,
)
from tests.test_ossea import OSSEA_DDL, execute


def test_one_parser_for_every_url_with_a_password() -> None:
    raw = "a#b/c?d@e:f"
    parts = split_url(f"mysql://volumed:{raw}@db.example:3307/volumed")
    assert (parts.user, parts.password) == ("volumed", raw)
    assert (parts.hostname, parts.port, parts.rest) == ("db.example", "3307", "/volumed")
    assert mask_url_password(f"mysql://volumed:{raw}@db:3307/v") == "mysql://volumed:***@db:3307/v"
    # Percent-encoded: masked as written, and known in both forms.
    assert url_secrets("http://admin:p%40ss%23@h/client/api") == ["p%40ss%23", "p@ss#"]
    assert split_url("http://[::1]:8080/client/api").hostname == "::1"
    assert split_url("http://h/client/api").password is None
    # The safety net, for texts nobody parsed: any URL's password, and every known secret.
    text = "GET http://admin:x#y@h:1/client/api failed; key cs-secret-123 refused"
    assert mask_secrets(text, ["cs-secret-123"]) == (
        "GET http://admin:***@h:1/client/api failed; key *** refused"
    )
    settings = load_settings(
        environ={"CLOUDSTACK_ENDPOINT": "http://admin:ep-pass-789@cs:8080/client/api"}
    )
    assert "ep-pass-789" not in repr(settings) and "ep-pass-789" in settings.secrets()
    assert settings.redacted()["cloudstack_endpoint"] == "http://admin:***@cs:8080/client/api"


def _password() -> tuple[str, str]:
    """A password with a character that must be percent-encoded in a URL: (raw, encoded)."""
    tag = uuid.uuid4().hex[:10]
    return f"cs@pw-{tag}", f"cs%40pw-{tag}"


def _dead_endpoint(encoded_password: str) -> str:
    return f"http://admin:{encoded_password}@127.0.0.1:{free_port()}/client/api"


async def _everything_said(
    nats_url: str, database: Database, op_id: str
) -> tuple[list[bytes], dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Send a create to a CloudStack that does not answer; return the events, the query
    answer, the row and a health answer that carries the executor's CloudStack check."""
    user = await Bus.connect(nats_url, "user")
    try:
        events: list[bytes] = []

        async def on_event(_s: str, data: bytes, _r: str | None) -> None:
            events.append(data)

        await user.subscribe("volume.events.>", on_event)

        # Once the executor's CloudStack check has failed, it has its credentials.
        async def health_with_cloudstack() -> dict[str, Any] | None:
            try:
                reply = json.loads(await user.request("volume.api.health", {}, timeout=2))
            except Exception:
                return None
            detail = reply["checks"].get("cloudstack", {}).get("detail", "")
            return reply if "cannot reach CloudStack" in detail else None

        health = await wait_for(health_with_cloudstack, 30, interval=0.2)
        body = {
            "operation_id": op_id,
            "name": "secret-test",
            "size": 1 << 30,
            "disk_offering_id": "do-1",
            "zone_id": "zone-1",
        }

        async def published() -> bool:
            try:
                await user.publish("volume.cmd.create", body)
                return True
            except Exception:
                return False

        await wait_for(published, 10, interval=0.2)
        await wait_for(lambda: any(b'"failed"' in e for e in events), 60)

        async def persisted() -> dict[str, Any] | None:
            answer = json.loads(await user.request("volume.api.operation", {"operation_id": op_id}))
            return answer if answer.get("status") == "failed" else None

        answer = await wait_for(persisted, 15, interval=0.1)

        rows = await database.query("SELECT * FROM volume_operations WHERE id = %s", op_id)
        return events, answer, rows, health
    finally:
        await user.close()


def _assert_nowhere(secrets: list[str], **places: object) -> None:
    for name, place in places.items():
        text = place if isinstance(place, str) else json.dumps(place, default=str)
        for secret in secrets:
            assert secret not in text, f"{secret!r} in the {name}"


async def _volumed_facing_a_dead_cloudstack(
    nats_server: NatsServer, database: Database, tmp_path: Path, **env: str
) -> dict[str, Any]:
    """Run `volumed run executor persistence` with ``env``; return all it said: its log,
    the events, the query answer, the row, the health answer, and the failed event."""
    log_path = tmp_path / "volumed.log"
    process = VolumedProcess(
        {
            "VOLUMED_NATS_URL": nats_server.url,
            "VOLUMED_DB_DSN": database.dsn,
            "VOLUMED_CLOUDSTACK_RETRY_BUDGET": "0.5",
            "VOLUMED_CLOUDSTACK_RETRY_BACKOFF": "0.05",
            "VOLUMED_HEARTBEAT_INTERVAL": "0.5",
            "VOLUMED_LOG_LEVEL": "DEBUG",  # the most a log can say
            **env,
        },
        ("executor", "persistence"),
        log_path=log_path,
    )
    await process.start()
    op_id = f"s-{uuid.uuid4().hex[:12]}"
    try:
        events, answer, rows, health = await _everything_said(nats_server.url, database, op_id)
    finally:
        assert await process.stop() == 0
    failed = json.loads(next(e for e in events if b'"failed"' in e))
    assert failed["error"]["code"] == "cloudstack_unavailable", failed
    return dict(
        log=log_path.read_text(),
        events=events,
        answer=answer,
        rows=rows,
        health=health,
        failed=failed,
    )


async def test_a_password_in_the_cloudstack_endpoint_is_nowhere(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    raw, encoded = _password()
    endpoint = _dead_endpoint(encoded)
    said = await _volumed_facing_a_dead_cloudstack(
        nats_server,
        database,
        tmp_path,
        CLOUDSTACK_ENDPOINT=endpoint,
        CLOUDSTACK_KEY="key-1",
        CLOUDSTACK_SECRET="secret-" + uuid.uuid4().hex,
        VOLUMED_VM_ID="vm-1",
    )
    # The failure was reported, naming the host only …
    host = endpoint.rpartition("@")[2].split("/")[0]
    assert f"cannot reach CloudStack at {host} " in said["failed"]["error"]["message"]
    assert "admin:***@127.0.0.1" in said["log"]  # the start-up settings line, masked
    # … and the password, written or decoded, is in none of what volumed said.
    _assert_nowhere([raw, encoded], **said)


async def test_a_password_in_ossea_configs_api_url_is_nowhere(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    raw, encoded = _password()
    await execute(database, OSSEA_DDL)
    await execute(
        database,
        "INSERT INTO ossea_configs (name, api_url, api_key, secret_key, oma_vm_id, is_active)"
        " VALUES ('main', %s, 'key-1', %s, 'vm-1', 1)",
        _dead_endpoint(encoded),
        "secret-" + uuid.uuid4().hex,
    )
    said = await _volumed_facing_a_dead_cloudstack(nats_server, database, tmp_path)
    _assert_nowhere([raw, encoded], **said)


@pytest.fixture
async def mariadb_user(database: Database) -> Any:
    """A MariaDB user whose password holds '#', '/', '?', '@' and ':' (dropped afterwards),
    allowed to create and use the test database."""
    parts = [uuid.uuid4().hex[:6] for _ in range(6)]
    password = f"{parts[0]}#{parts[1]}/{parts[2]}?{parts[3]}@{parts[4]}:{parts[5]}"
    user = f"h4_{uuid.uuid4().hex[:10]}"
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
            await cur.execute(f"GRANT ALL ON `{database.name}`.* TO '{user}'@'%'")
        yield user, password, parts
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        conn.close()


async def test_a_dsn_password_with_url_characters_connects_and_is_never_logged(
    nats_server: NatsServer, database: Database, mariadb_user: Any, tmp_path: Path
) -> None:
    user, password, parts = mariadb_user
    dsn = f"mysql://{user}:{password}@{MARIADB_HOST}:{MARIADB_PORT}/{database.name}"
    log_path = tmp_path / "volumed.log"
    process = VolumedProcess(
        {"VOLUMED_NATS_URL": nats_server.url, "VOLUMED_DB_DSN": dsn, "VOLUMED_VM_ID": "vm-1"},
        ("persistence",),
        log_path=log_path,
    )
    await process.start()
    bus = await Bus.connect(nats_server.url, "user")
    try:

        async def database_ok() -> dict[str, Any] | None:
            try:
                reply = json.loads(await bus.request("volume.api.health", {}, timeout=2))
            except Exception:
                return None
            return reply if reply["checks"]["database"]["status"] == "ok" else None

        health = await wait_for(database_ok, 30, interval=0.2)
    finally:
        await bus.close()
        assert await process.stop() == 0
    # Connected as that user: volumed created the database and its tables.
    assert await database.query("SELECT COUNT(*) AS n FROM volume_operations") == [{"n": 0}]
    log = log_path.read_text()
    assert f"mysql://{user}:***@{MARIADB_HOST}:{MARIADB_PORT}/{database.name}" in log
    # Neither the password nor any piece of it between the URL characters.
    _assert_nowhere([password, *parts], log=log, health=health)
