"""Bucket.keys() lists every key, beyond the 100,000 subjects one stream-info reply holds."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from bus import Bus
from bus.topology import BucketSpec, Topology
from tests.conftest import NatsServer

# One page of stream info lists at most this many subjects (nats-server's JSMaxSubjectDetails).
SERVER_PAGE = 100_000


async def check_all_keys_listed(url: str, bucket_name: str) -> None:
    bus = await Bus.connect(url, "test-kv-keys")
    spec = BucketSpec(name=bucket_name)
    try:
        await bus.provision(Topology(buckets=(spec,)))
        bucket = await bus.bucket(spec, bytes)
        wanted = {f"k{i:06d}" for i in range(SERVER_PAGE + 3)}
        # Core publishes into the bucket's stream: a hundred thousand puts in about a second.
        for key in wanted:
            await bus.nc.publish(f"$KV.{bucket_name}.{key}", b'"x"')
        await bus.nc.flush()
        for _ in range(200):
            info = await bus.js.stream_info(f"KV_{bucket_name}")
            if info.state.messages == len(wanted):
                break
            await asyncio.sleep(0.05)
        assert info.state.messages == len(wanted)
        keys = await bucket.keys()
        assert len(keys) == len(wanted)
        assert set(keys) == wanted
    finally:
        try:
            await bus.js.delete_key_value(bucket_name)
        finally:
            await bus.close()


async def test_keys_beyond_one_stream_info_page(nats_server: NatsServer) -> None:
    await check_all_keys_listed(nats_server.url, f"keys_{uuid.uuid4().hex[:8]}")


async def test_keys_beyond_one_page_on_another_server() -> None:
    """The same on a server named by VOLUMED_TEST_OTHER_NATS (e.g. Debian's nats-server
    2.9.10 on nats://127.0.0.1:4222), with a bucket of its own deleted afterwards."""
    url = os.environ.get("VOLUMED_TEST_OTHER_NATS")
    if not url:
        pytest.skip("VOLUMED_TEST_OTHER_NATS is not set")
    await check_all_keys_listed(url, f"volumed_test_keys_{uuid.uuid4().hex[:8]}")
