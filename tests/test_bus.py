"""The bus against a real nats-server: provisioning, the ack decision, KV compare-and-set."""

from __future__ import annotations

import asyncio

import pytest

from bus import Bus, Conflict, Consumer, Delivery, Reject, Retry
from bus.topology import (
    COMMANDS,
    DEAD_LETTERS,
    EXECUTOR,
    OPERATIONS_BUCKET,
    TOPOLOGY,
    Topology,
    command_subject,
)
from schemas.internal import OpRecord
from tests.conftest import NatsServer, wait_for


@pytest.fixture
async def bus(nats_server: NatsServer):  # type: ignore[no-untyped-def]
    b = await Bus.connect(nats_server.url, "test")
    await b.provision(TOPOLOGY)
    yield b
    await b.close()


async def test_provision_is_idempotent(bus: Bus) -> None:
    await bus.provision(TOPOLOGY)
    info = await bus.js.stream_info(COMMANDS.name)
    assert set(info.config.subjects or []) == {
        command_subject(t) for t in ("create", "attach", "detach", "delete", "cancel", "resize")
    }
    assert (
        await bus.js.consumer_info(COMMANDS.name, EXECUTOR.durable)
    ).config.max_deliver == EXECUTOR.max_deliver


async def test_consumer_ack_retry_reject(bus: Bus) -> None:
    seen: list[tuple[bytes, int]] = []

    async def handler(d: Delivery) -> None:
        seen.append((d.data, d.num_delivered))
        if d.data == b"retry" and d.num_delivered == 1:
            raise Retry("later", delay=0.1)
        if d.data == b"poison":
            raise Reject("cannot be processed")

    consumer = Consumer(bus, EXECUTOR, handler, concurrency=4)
    task = asyncio.create_task(consumer.run(grace=1))
    for body in (b"ok", b"retry", b"poison"):
        await bus.publish(command_subject("create"), body)
    await wait_for(lambda: (b"retry", 2) in seen and (b"poison", 1) in seen)
    await asyncio.sleep(0.3)
    consumer.stop()
    await task
    # Each delivered exactly as the outcome says: ok once, retry twice, poison once.
    assert sorted(seen) == sorted([(b"ok", 1), (b"retry", 1), (b"retry", 2), (b"poison", 1)])
    dead = await bus.js.stream_info(DEAD_LETTERS.name)
    assert dead.state.messages == 1
    info = await bus.js.consumer_info(COMMANDS.name, EXECUTOR.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_kv_create_is_a_claim_and_update_compares(bus: Bus) -> None:
    ops = await bus.bucket(OPERATIONS_BUCKET, OpRecord)
    rec = OpRecord(operation_id="a", type="create", status="pending", stream_seq=1)
    rev = await ops.create("a", rec)
    with pytest.raises(Conflict):
        await ops.create("a", rec)
    rec.status = "executing"
    rev2 = await ops.update("a", rec, rev)
    with pytest.raises(Conflict):
        await ops.update("a", rec, rev)
    got = await ops.get("a")
    assert got is not None and got[0].status == "executing" and got[1] == rev2


async def test_works_on_the_machines_old_server() -> None:
    """Provisioning must also work on Debian's nats-server 2.9.10 (127.0.0.1:4222)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=0.5).close()
    except OSError:
        pytest.skip("no nats-server on 127.0.0.1:4222")
    b = await Bus.connect("nats://127.0.0.1:4222", "test-old")
    try:
        await b.provision(TOPOLOGY)
        await b.provision(TOPOLOGY)
    finally:
        await b.close()


async def test_consumer_carries_on_after_a_server_restart(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, "restart")
    await bus.provision(TOPOLOGY)
    seen: list[bytes] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.data)

    consumer = Consumer(bus, EXECUTOR, handler, concurrency=4)
    task = asyncio.create_task(consumer.run(grace=1))
    try:
        await bus.publish(command_subject("create"), b"before")
        await wait_for(lambda: b"before" in seen)
        nats_server.stop()
        await asyncio.sleep(0.5)
        nats_server.start()
        await wait_for(lambda: bus.connected, 10)

        async def published() -> bool:
            try:
                await bus.publish(command_subject("create"), b"after")
                return True
            except Exception:
                return False

        await wait_for(published, 10, interval=0.2)
        # Well before the 11 s a lost pull would take to notice by missing heartbeats.
        await wait_for(lambda: b"after" in seen, 3)
    finally:
        consumer.stop()
        await task
        await bus.close()


async def test_flush_puts_a_ping_behind_what_was_sent_before(nats_server: NatsServer) -> None:
    """Bus.flush returns only when the server has read a SUB (or PUB) made just before: a
    PING follows it on the wire (the server answers a PING after reading all before it).
    One nats-py flush writes its PING ahead of the SUB still in nats-py's pending buffer,
    so another connection's publish could overtake the subscription."""
    wire = bytearray()  # what the server received from the client, in order

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: bool) -> None:
        try:
            while data := await reader.read(65536):
                if rec:
                    wire.extend(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
        await asyncio.gather(
            pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True
        )

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    b = await Bus.connect(f"nats://127.0.0.1:{port}", "test-flush")
    try:

        async def nothing(subject: str, data: bytes, reply: str | None) -> None:
            pass

        await b.subscribe("flush.probe", nothing)
        await b.flush()
        sent = bytes(wire)
        assert b"SUB flush.probe" in sent
        assert sent.rfind(b"PING\r\n") > sent.find(b"SUB flush.probe"), sent
    finally:
        await b.close()
        proxy.close()


async def test_waiting_handlers_never_keep_out_what_they_wait_for(bus: Bus) -> None:
    """One slot. The first command is handed back (as if its process died); three more wait
    for it. Parked, the waiters leave the slot to its redelivery, and all four end; holding
    the slot (not parked), they would wait for ever."""
    from dataclasses import replace

    from bus import Abandon

    await bus.js.delete_consumer(EXECUTOR.stream, EXECUTOR.durable)
    spec = replace(EXECUTOR, ack_wait=0.5)
    await bus.provision(Topology(consumers=(spec,)))
    first_done = asyncio.Event()
    first = await bus.publish(command_subject("delete"), b'{"volume_id": "v"}')
    for _ in range(3):
        await bus.publish(command_subject("delete"), b'{"volume_id": "v"}')
    ended: list[int] = []

    async def handler(d: Delivery) -> None:
        if d.stream_seq == first:
            if d.num_delivered == 1:
                raise Abandon("as if its process died")
            first_done.set()
        else:
            with d.parked():
                await first_done.wait()
        ended.append(d.stream_seq)

    consumer = Consumer(bus, spec, handler, concurrency=1)
    task = asyncio.create_task(consumer.run(grace=0.5))
    try:
        await wait_for(lambda: len(ended) == 4, 10)
    finally:
        consumer.stop()
        await task


async def test_the_consumer_gives_a_command_up_only_after_ending_its_work(bus: Bus) -> None:
    """Delivered more often than give_up_after (its processes died each time): the handler
    does not run again; its work is ended (on_give_up), then the message is dead-lettered
    and terminated. While ending it fails, the message stays."""
    from dataclasses import replace

    from bus import Abandon

    await bus.js.delete_consumer(EXECUTOR.stream, EXECUTOR.durable)
    spec = replace(EXECUTOR, ack_wait=0.3, max_deliver=-1, give_up_after=2, backoff=())
    await bus.provision(Topology(consumers=(spec,)))
    handled: list[int] = []
    given_up: list[int] = []

    async def handler(d: Delivery) -> None:
        handled.append(d.num_delivered)
        raise Abandon("as if the process died")

    async def give_up(d: Delivery, reason: str) -> None:
        given_up.append(d.num_delivered)
        if len(given_up) == 1:
            raise RuntimeError("cannot end it yet")
        assert "delivered" in reason

    seq = await bus.publish(command_subject("delete"), b'{"volume_id": "v"}')
    consumer = Consumer(bus, spec, handler, concurrency=2, on_give_up=give_up)
    task = asyncio.create_task(consumer.run(grace=0.5))
    try:
        await wait_for(lambda: len(given_up) == 2, 10)
        assert handled == [1, 2] and given_up == [3, 4]

        async def floor() -> bool:
            return (await bus.consumer_progress(spec)).ack_floor >= seq

        await wait_for(floor, 5)
        dead = await bus.last_stored(
            DEAD_LETTERS.name, f"volumed.dead.{spec.stream}.{spec.durable}"
        )
        assert dead is not None and dead.headers["Volumed-Stream-Seq"] == str(seq)
    finally:
        consumer.stop()
        await task


def test_a_connect_to_a_down_server_ends_when_cancelled_at_any_moment() -> None:
    """What a SIGTERM does to `volumed run` while NATS is down. Under uvloop (as `volumed
    run` runs) the refusal often comes in the same loop step as the cancel, which Python
    3.11's wait_for then hides, and nats-py used to go on retrying for ever."""
    import uvloop

    from tests.conftest import free_port

    async def main() -> None:
        url = f"nats://127.0.0.1:{free_port()}"
        for i in range(60):
            delay = 0.0005 * (i % 20)
            task = asyncio.create_task(Bus.connect(url, "cancelled"))
            await asyncio.sleep(delay)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, f"still connecting 5 s after a cancel {delay} s into it"

    uvloop.run(main())


async def test_a_service_whose_database_is_away_answers_503_not_500(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """Tried from outside: while persistence could not open the database (the Go daemon's
    tables), every query answered 500 "internal error; see the volumed log" and logged a
    traceback; the REST gateway passed that text on."""
    from bus import call
    from bus.errors import ServiceFailed
    from bus.service import serve

    async def away(body: bytes) -> dict[str, str]:
        raise ConnectionError("the database is not connected yet")

    service = await serve(bus, "t503", "0.0.1", "test", {"q": ("t503.q", away)})
    try:
        with pytest.raises(ServiceFailed) as failed:
            await call(bus, "t503.q", {}, timeout=2)
    finally:
        await service.stop()
    assert failed.value.code == "503"
    assert "the database is not connected yet" in failed.value.text
    assert not any(r.exc_info for r in caplog.records)
