"""CloudStack credentials and the local VM id from the active `ossea_configs` row, read fresh
for every operation: a changed row takes effect without a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import aiomysql
import pytest

from schemas.config import Settings
from simulator import SimConfig, Simulator
from tests.conftest import (
    MARIADB_HOST,
    MARIADB_PORT,
    Database,
    NatsServer,
    start_volumed,
    stop_volumed,
)
from tests.test_lifecycle import create_body, op

OSSEA_DDL = """
CREATE TABLE ossea_configs (
  id INT AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(64),
  api_url VARCHAR(255) NOT NULL,
  api_key VARCHAR(255) NOT NULL,
  secret_key VARCHAR(255) NOT NULL,
  oma_vm_id VARCHAR(64),
  is_active TINYINT(1) NOT NULL DEFAULT 0
)"""


async def execute(db: Database, sql: str, *args: object) -> None:
    conn = await aiomysql.connect(
        host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db.name}`")
            await cur.execute(f"USE `{db.name}`")
            await cur.execute(sql, args or None)
    finally:
        conn.close()


async def test_credentials_follow_the_active_row(
    nats_server: NatsServer, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + uuid.uuid4().hex
    async with Simulator(SimConfig(seed=21)) as sim:
        await execute(database, OSSEA_DDL)
        await execute(
            database,
            "INSERT INTO ossea_configs (name, api_url, api_key, secret_key,"
            " oma_vm_id, is_active) VALUES ('old', %s, %s, %s, %s, 1)",
            sim.url,
            sim.api_key,
            wrong,
            sim.local_vm_id,
        )
        settings = Settings(
            nats_url=nats_server.url,
            db_dsn=database.dsn,
            instance="ossea",
            cloudstack_retry_backoff=0.02,
            cloudstack_poll_interval=0.05,
        )
        harness, task = await start_volumed(settings, ["persistence", "executor"], sim)
        try:
            first = op()
            await harness.send("create", create_body(sim, first, "ossea-1"))
            event = await harness.terminal(first)
            assert event["status"] == "failed"
            assert event["error"]["code"] == "unauthorized"  # type: ignore[index]

            # The operator fixes the row: the next operation uses it, no restart.
            await execute(database, "UPDATE ossea_configs SET is_active=0")
            await execute(
                database,
                "INSERT INTO ossea_configs (name, api_url, api_key, "
                "secret_key, oma_vm_id, is_active) VALUES ('new', %s, %s, %s, %s, 1)",
                sim.url,
                sim.api_key,
                sim.secret_key,
                sim.local_vm_id,
            )
            second = op()
            await harness.send("create", create_body(sim, second, "ossea-2"))
            event = await harness.terminal(second)
            assert event["status"] == "completed", event
            row = await harness.row(database, first, "failed")
        finally:
            await stop_volumed(harness, task)
    for secret in (wrong, sim.secret_key):
        assert secret not in json.dumps(harness.events, default=str)
        assert secret not in json.dumps(row, default=str)
        assert secret not in caplog.text


async def test_no_credentials_anywhere_is_explained(
    nats_server: NatsServer, database: Database
) -> None:
    async with Simulator(SimConfig(seed=22)) as sim:
        settings = Settings(
            nats_url=nats_server.url,
            db_dsn=database.dsn,
            instance="nocreds",
            vm_id="vm-x",
            cloudstack_retry_backoff=0.02,
        )
        harness, task = await start_volumed(settings, ["persistence", "executor"], sim)
        try:
            o = op()
            await harness.send("create", create_body(sim, o, "nocreds"))
            event = await harness.terminal(o)
            assert event["status"] == "failed"
            assert event["error"]["code"] == "unauthorized"  # type: ignore[index]
            assert "ossea_configs" in event["error"]["message"]  # type: ignore[index]
        finally:
            await stop_volumed(harness, task)


async def test_credentials_wait_out_a_persistence_blip(
    nats_server: NatsServer, database: Database
) -> None:
    """No persistence actor answers when an operation's turn comes (its process restarting,
    its connection cut): the executor keeps asking, and the operation completes once one
    answers, instead of failing `unauthorized`."""
    async with Simulator(SimConfig(seed=22)) as sim:
        await execute(database, OSSEA_DDL)
        await execute(
            database,
            "INSERT INTO ossea_configs (name, api_url, api_key, secret_key,"
            " oma_vm_id, is_active) VALUES ('site', %s, %s, %s, %s, 1)",
            sim.url,
            sim.api_key,
            sim.secret_key,
            sim.local_vm_id,
        )
        settings = Settings(
            nats_url=nats_server.url,
            db_dsn=database.dsn,
            instance="blip",
            cloudstack_retry_backoff=0.02,
            cloudstack_poll_interval=0.05,
        )
        harness, task = await start_volumed(settings, ["executor"], sim)
        writer = None
        try:
            first = op()
            await harness.send("create", create_body(sim, first, "blip-1"))
            await asyncio.sleep(6.0)  # longer than one credentials request waits
            assert "failed" not in harness.statuses(first), harness.events[first]
            writer = await start_volumed(settings, ["persistence"], sim)
            event = await harness.terminal(first, timeout=20)
            assert event["status"] == "completed", event
        finally:
            if writer is not None:
                await stop_volumed(*writer)
            await stop_volumed(harness, task)
