"""The Prometheus endpoint (VOLUMED_METRICS_ADDR): it answers, its counters and histograms
follow real operations through the daemon, and every metric the alert rules and the Grafana
dashboard in deploy/ use is one it serves."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from schemas.common import now_rfc3339
from schemas.config import ConfigError, load_settings
from simulator import Fault, Simulator
from tests.conftest import (
    Database,
    Harness,
    NatsServer,
    VolumedProcess,
    start_volumed,
    stop_volumed,
    wait_for,
)
from tests.test_devices_e2e import fake_tree, hotplugging
from tests.test_devices_e2e import start as start_with_devices
from tests.test_lifecycle import create_body, op, remote_vm, settings_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "volumed-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "volumed-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "volumed-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One answer of /metrics: the families by name and every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        """Every name a query may use, of families with samples or without yet."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        out = set(self.families) | {name for name, _ in self.samples}
        for name, family in self.families.items():
            out |= {name + suffix for suffix in suffixes.get(family.type, ())}
        return out


async def scrape(v: Harness) -> Scrape:
    port = v.supervisor.metrics.port  # type: ignore[attr-defined]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as reply,
    ):
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await reply.text())


@pytest.fixture
async def sim():  # type: ignore[no-untyped-def]
    from simulator import SimConfig

    async with Simulator(SimConfig(seed=7)) as s:
        yield s


@pytest.fixture
async def volumed(nats_server: NatsServer, database: Database, sim: Simulator):  # type: ignore[no-untyped-def]
    """The executor and persistence, serving /metrics on a port the system chooses."""
    settings = settings_for(nats_server, database, sim, metrics_addr="127.0.0.1:0")
    v, task = await start_volumed(settings, ["persistence", "executor"], sim)
    yield v
    await stop_volumed(v, task)


async def test_counters_and_histograms_follow_real_operations(
    volumed: Harness, sim: Simulator
) -> None:
    v = volumed
    before = await scrape(v)
    assert before.value("volumed_actor_up", actor="executor") == 1
    assert before.value("volumed_actor_up", actor="persistence") == 1
    assert before.value("volumed_server_metrics_up") == 1
    # Consumer lag is the server's: there from the start, for every durable.
    lag = ("volumed_consumer_pending_messages", "VOLUMED_COMMANDS", "executor")
    assert (lag[0], frozenset({("stream", lag[1]), ("consumer", lag[2])})) in before.samples

    # A create that meets one transient failure, then succeeds.
    sim.inject(Fault(kind="http", command="createVolume", status=503, count=1))
    c = op()
    await v.send("create", create_body(sim, c, "metrics-1"))
    created = await v.terminal(c)
    assert created["status"] == "completed", created
    # An attach to another VM, an attach of a volume that does not exist, an invalid one.
    a, missing, bad = op(), op(), op()
    vm = remote_vm(sim)
    await v.send("attach", {"operation_id": a, "volume_id": created["volume_id"], "vm_id": vm})
    await v.send("attach", {"operation_id": missing, "volume_id": "no-such", "vm_id": vm})
    await v.send("attach", {"operation_id": bad, "volume_id": "x"})
    assert (await v.terminal(a))["status"] == "completed"
    assert (await v.terminal(missing))["error"]["code"] == "not_found"  # type: ignore[index]
    assert (await v.terminal(bad))["status"] == "rejected"
    # The create sent again: its latest event is published again, never counted again.
    await v.send("create", create_body(sim, c, "metrics-1"))
    await wait_for(lambda: len(v.events[c]) == 4)

    async def counted() -> Scrape | None:
        after = await scrape(v)
        rejected = {"type": "attach", "status": "rejected", "code": "invalid_request"}
        stored = "volumed_events_stored_total"
        done = (
            after.value("volumed_operations_total", **rejected)
            > before.value("volumed_operations_total", **rejected)
            # 3 events for each of three operations, 1 rejected, 1 sent again
            and after.value(stored) - before.value(stored) >= 11
        )
        return after if done else None

    after = await wait_for(counted)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    ops = "volumed_operations_total"
    assert delta(ops, type="create", status="completed", code="") == 1
    assert delta(ops, type="attach", status="completed", code="") == 1
    assert delta(ops, type="attach", status="failed", code="not_found") == 1
    assert delta(ops, type="attach", status="rejected", code="invalid_request") == 1
    took = "volumed_operation_duration_seconds_count"
    assert delta(took, type="create", status="completed") == 1
    assert delta(took, type="attach", status="failed") == 1
    assert delta("volumed_operation_duration_seconds_sum", type="create", status="completed") > 0
    # Nothing is left in flight, so nothing is stuck.
    assert not any(
        value
        for (name, _), value in after.samples.items()
        if name.startswith("volumed_operations_in")
    )

    assert delta("volumed_cloudstack_calls_total", command="createVolume") == 2
    assert delta("volumed_cloudstack_calls_total", command="attachVolume") == 1
    errors = "volumed_cloudstack_errors_total"
    assert delta(errors, command="createVolume", kind="cloudstack_unavailable") == 1
    assert delta("volumed_cloudstack_calls_total", command="listVolumes") >= 1
    assert delta("volumed_cloudstack_retries_total") >= 1
    assert delta("volumed_cloudstack_call_duration_seconds_count", command="attachVolume") == 1

    # An event persistence cannot read is dead-lettered: the server's count says so.
    held = {"stream": "VOLUMED_EVENTS", "consumer": "persistence"}
    assert after.value("volumed_dead_letters", **held) == 0
    await v.bus.js.publish("volume.events.garbage", b"not json")  # type: ignore[attr-defined]

    async def dead_lettered() -> bool:
        return (await scrape(v)).value("volumed_dead_letters", **held) == 1

    await wait_for(dead_lettered)


async def test_device_events_and_correlation_latency(
    nats_server: NatsServer, database: Database, tmp_path: Path
) -> None:
    sysfs, dev = fake_tree(tmp_path)
    async with Simulator(hotplugging(sysfs, dev, seed=8, serials=True)) as sim:
        v = await start_with_devices(
            nats_server, database, sim, sysfs, dev, metrics_addr="127.0.0.1:0"
        )
        try:
            before = await scrape(v)
            for actor in ("persistence", "executor", "watcher", "correlator"):
                await wait_for(
                    lambda a=actor: v.supervisor.actors.get(a) is not None  # type: ignore[attr-defined]
                )
            c = op()
            await v.send("create", create_body(sim, c, "metrics-local"))
            volume_id = (await v.terminal(c))["volume_id"]
            a = op()
            await v.send(
                "attach", {"operation_id": a, "volume_id": volume_id, "vm_id": sim.local_vm_id}
            )
            attached = await v.terminal(a)
            assert attached["status"] == "completed" and attached["device_path"], attached

            async def reported() -> Scrape | None:
                after = await scrape(v)
                return after if after.value("volumed_actors_reporting", actor="watcher") else None

            after = await wait_for(reported)

            def delta(name: str, **labels: str) -> float:
                return after.value(name, **labels) - before.value(name, **labels)

            assert after.value("volumed_actor_up", actor="correlator") == 1
            added = sum(
                value
                for (name, labels), value in after.samples.items()
                if name == "volumed_device_events_total" and ("kind", "added") in labels
            ) - sum(
                value
                for (name, labels), value in before.samples.items()
                if name == "volumed_device_events_total" and ("kind", "added") in labels
            )
            assert added == 1
            assert delta("volumed_correlations_total", result="serial") == 1
            assert delta("volumed_correlation_latency_seconds_count") == 1
            assert after.value("volumed_attaches_waiting") == 0
            assert after.value("volumed_actors_reporting", actor="correlator") >= 1
            assert after.value("volumed_actors_reporting", actor="executor") >= 1
        finally:
            await stop_volumed(v, v.task)  # type: ignore[attr-defined]


def test_metrics_address_and_log_format_are_checked_at_start() -> None:
    for good in ("127.0.0.1:9464", ":9464", "[::1]:0", "metrics.local:65535"):
        assert load_settings(environ={"VOLUMED_METRICS_ADDR": good}).metrics_addr == good
    for bad in ("9464", "127.0.0.1:65536", "127.0.0.1:", "http://127.0.0.1:9464", "a b:1"):
        with pytest.raises(ConfigError, match="VOLUMED_METRICS_ADDR"):
            load_settings(environ={"VOLUMED_METRICS_ADDR": bad})
    assert load_settings(environ={}).metrics_addr is None  # no endpoint by default
    assert load_settings(environ={"VOLUMED_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="VOLUMED_LOG_FORMAT"):
        load_settings(environ={"VOLUMED_LOG_FORMAT": "xml"})


async def test_stuck_operations_are_checked_against_the_event_stream(
    nats_server: NatsServer,
) -> None:
    """An operation not ended 5 minutes after its first event is stuck, unless the stream's
    newest event for it says it ended (this process missed that event: it is counted then)
    or the stream has none left (it aged out: forgotten)."""
    from actors.metrics.exporter import MetricsServer
    from bus import Bus
    from bus.topology import TOPOLOGY, event_subject
    from schemas.config import Settings
    from schemas.events import ErrorInfo, OperationEvent

    bus = await Bus.connect(nats_server.url, "metrics-test")
    try:
        await bus.provision(TOPOLOGY)
        # Not started: nothing follows the stream, as for events this process missed.
        server = MetricsServer(bus, Settings(nats_url=nats_server.url), "127.0.0.1:0")
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
        at = long_ago.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        recent = now_rfc3339()

        def event(op_id: str, op_type: str, status: str, when: str) -> OperationEvent:
            error = ErrorInfo(code="conflict", message="x") if status == "failed" else None
            return OperationEvent(
                operation_id=op_id,
                type=op_type,
                status=status,
                at=when,
                error=error,  # type: ignore[arg-type]
            )

        hung, ended, gone, young = (f"{n}-{uuid.uuid4().hex[:8]}" for n in "hegy")
        for op_id, op_type, when in (
            (hung, "attach", at),
            (ended, "detach", at),
            (gone, "delete", at),
            (young, "attach", recent),
        ):
            pending = event(op_id, op_type, "pending", when)
            server.operations.event(pending)
            if op_id != gone:
                await bus.publish(event_subject(op_id), pending)
        await bus.publish(event_subject(ended), event(ended, "detach", "failed", recent))
        labels = {"type": "detach", "status": "failed", "code": "conflict"}
        before = Scrape(server.exposition().decode()).value("volumed_operations_total", **labels)

        await server.refresh()
        after = Scrape(server.exposition().decode())
        assert after.value("volumed_operations_stuck", type="attach") == 1  # hung, not young
        assert after.value("volumed_operations_in_flight", type="attach", status="pending") == 2
        for op_type in ("detach", "delete"):
            assert after.value("volumed_operations_stuck", type=op_type) == 0
            assert after.value("volumed_operations_in_flight", type=op_type, status="pending") == 0
        assert after.value("volumed_operations_total", **labels) == before + 1
        # The missed end is known now: counted once, however often it is looked at.
        await server.refresh()
        again = Scrape(server.exposition().decode())
        assert again.value("volumed_operations_total", **labels) == before + 1
        assert (
            again.value("volumed_operation_duration_seconds_count", type="detach", status="failed")
            >= 1
        )
    finally:
        await bus.close()


async def test_a_taken_metrics_port_stops_volumed_run_at_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        process = VolumedProcess(
            {"VOLUMED_NATS_URL": nats_server.url, "VOLUMED_METRICS_ADDR": address},
            ("executor",),
            log_path=tmp_path / "log",
        )
        await process.start()
        assert await process.wait(30) == 2
    said = (tmp_path / "log").read_text()
    assert f"volumed: cannot serve metrics on VOLUMED_METRICS_ADDR={address}: " in said
    assert "Traceback" not in said


# -- deploy/: the alert rules and the dashboard ---------------------------------------------

_NAME = re.compile(r"\b(volumed_[a-z_]+|process_[a-z_]+)\b")


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]


def test_alert_rules_are_complete() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {
        "VolumedOperationsStuck",
        "VolumedFailureRateHigh",
        "VolumedActorDown",
        "VolumedConsumerLag",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query of the dashboard, with Grafana's variables filled in, as a recording rule
    that promtool checks (a typo in PromQL fails here, not on an operator's screen)."""
    grafana = {"$__rate_interval": "5m", "$__range": "6h", "$job": "volumed"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"volumed:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_rules_and_dashboard_use_only_served_metrics(volumed: Harness) -> None:
    served = (await scrape(volumed)).names()
    used = {n for expr in rule_exprs() + dashboard_exprs() for n in _NAME.findall(expr)}
    assert used, "the rules and the dashboard use no volumed metric"
    assert sorted(used - served) == []
