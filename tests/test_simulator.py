"""The CloudStack simulator, driven only through the real ``cs`` client (and /_sim for control)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cs import AIOCloudStack, CloudStackApiException, CloudStackException

from simulator import Fault, GuestConfig, SimConfig, Simulator, VMConfig
from simulator.cli import main as cli_main
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3

UNAUTHORIZED = "unable to verify user credentials and/or request signature"
ATTACHED = "Please specify a volume that is not attached to any VM."
NOT_ATTACHED = "The specified volume is not attached to a VM."


def invalid_id(value: str, param: str = "id") -> str:
    return (
        f"Invalid parameter {param} value={value} due to incorrect long value format, or entity "
        "does not exist or due to incorrect parameter annotation for the field in api cmd class."
    )


def client(sim: Simulator, **kwargs: Any) -> AIOCloudStack:
    options: dict[str, Any] = {
        "endpoint": sim.url,
        "key": sim.api_key,
        "secret": sim.secret_key,
        "fetch_result": True,
        "poll_interval": 0.01,
        "job_timeout": 10,
    }
    options.update(kwargs)
    return AIOCloudStack(**options)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(seed=3)) as s:
        yield s


@pytest.fixture
async def cs(sim: Simulator) -> AsyncIterator[AIOCloudStack]:
    async with client(sim) as c:
        yield c


def remote_vm(sim: Simulator) -> str:
    return next(v for v in sim.vm_ids if v != sim.local_vm_id)


async def create(cs: AIOCloudStack, sim: Simulator, name: str = "vol", gb: int = 1) -> str:
    result = await cs.createVolume(
        name=name, size=gb, diskofferingid=sim.disk_offering_ids[0], zoneid=sim.zone_id
    )
    return str(result["volume"]["id"])


async def control(sim: Simulator, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{sim.control_url}/{path}", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


# -- signatures --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "post"])
async def test_good_signature_with_awkward_values(sim: Simulator, method: str) -> None:
    name = "a b+c/d&e=f*g%h é"
    async with client(sim, method=method) as cs:
        zones = await cs.listZones()
        assert zones["count"] == 1 and zones["zone"][0]["id"] == sim.zone_id
        version = (await cs.listCapabilities())["capability"]["cloudstackversion"]
        assert version == sim.config.cloudstack_version
        volume_id = await create(cs, sim, name)
        found = await cs.listVolumes(name=name)
        assert [v["id"] for v in found["volume"]] == [volume_id]
        assert found["volume"][0]["name"] == name


async def test_wrong_secret_is_401(sim: Simulator) -> None:
    async with client(sim, secret=sim.secret_key + "x") as bad:
        with pytest.raises(CloudStackApiException) as raised:
            await bad.listZones()
    assert raised.value.response.status == 401
    assert raised.value.error == {
        "uuidList": [],
        "errorcode": 401,
        "cserrorcode": 0,
        "errortext": UNAUTHORIZED,
    }


async def test_expired_missing_expires_unsigned_and_unknown_are_401(
    sim: Simulator, cs: AIOCloudStack
) -> None:
    async def refused(c: AIOCloudStack, command: str = "listZones", **params: str) -> None:
        with pytest.raises(CloudStackApiException) as raised:
            await getattr(c, command)(**params)
        assert raised.value.error["errorcode"] == 401
        assert raised.value.error["errortext"] == UNAUTHORIZED

    await refused(cs, expires="2020-01-01T00:00:00+0000", signatureVersion="3")
    await refused(cs, expires="not a date", signatureVersion="3")
    async with client(sim, expiration=-1) as no_expiry:
        await refused(no_expiry, signatureVersion="3")  # version 3 without expires
        assert (await no_expiry.listZones())["count"] == 1  # no version: no expiry needed
    async with client(sim, secret=None) as unsigned:
        await refused(unsigned)
    async with client(sim, key="someone-else") as stranger:
        await refused(stranger)
    await refused(cs, "noSuchCommand")
    # A future expires is fine.
    assert (await cs.listZones(expires="2999-01-01T00:00:00+0000", signatureVersion="3"))["zone"]


# -- volumes -----------------------------------------------------------------------------


async def test_create_attach_device_ids_and_lists(sim: Simulator, cs: AIOCloudStack) -> None:
    vm = remote_vm(sim)
    started = await cs.createVolume(
        name="v0",
        size=3,
        diskofferingid=sim.disk_offering_ids[0],
        zoneid=sim.zone_id,
        fetch_result=False,
    )
    assert set(started) == {"id", "jobid"}
    job = await cs.queryAsyncJobResult(jobid=started["jobid"], fetch_result=False)
    assert job["jobstatus"] == 1 and job["jobresultcode"] == 0
    created = job["jobresult"]["volume"]
    assert created["id"] == started["id"]
    assert created["state"] == "Allocated" and created["size"] == 3 * GIB
    assert created["type"] == "DATADISK" and "virtualmachineid" not in created

    ids = [started["id"]] + [await create(cs, sim, f"v{n}") for n in range(1, 5)]
    device_ids = []
    for volume_id in ids[:4]:
        attached = (await cs.attachVolume(id=volume_id, virtualmachineid=vm))["volume"]
        assert attached["state"] == "Ready" and attached["virtualmachineid"] == vm
        device_ids.append(attached["deviceid"])
    assert device_ids == [1, 2, 4, 5]  # 3 is the CD-ROM's

    # Detach frees 2, the next attach takes it again.
    detached = (await cs.detachVolume(id=ids[1]))["volume"]
    assert "virtualmachineid" not in detached and detached["state"] == "Ready"
    assert (await cs.attachVolume(id=ids[4], virtualmachineid=vm))["volume"]["deviceid"] == 2

    on_vm = await cs.listVolumes(virtualmachineid=vm)
    assert on_vm["count"] == 5
    assert [v["deviceid"] for v in on_vm["volume"]] == [0, 1, 2, 4, 5]
    roots = await cs.listVolumes(virtualmachineid=vm, type="ROOT")
    assert [v["deviceid"] for v in roots["volume"]] == [0]
    assert (await cs.listVolumes(name="v1", zoneid=sim.zone_id))["volume"][0]["id"] == ids[1]
    page = await cs.listVolumes(virtualmachineid=vm, page=2, pagesize=2)
    assert page["count"] == 5 and len(page["volume"]) == 2
    everything = await cs.listVolumes(fetch_list=True, pagesize=2)
    assert {v["id"] for v in everything} >= set(ids)
    assert await cs.listVolumes(name="nothing-has-this-name") == {}
    assert len((await cs.listVirtualMachines())["virtualmachine"]) == len(sim.vm_ids)
    offerings = (await cs.listDiskOfferings())["diskoffering"]
    assert [o["id"] for o in offerings] == sim.disk_offering_ids


async def test_resize_and_delete(sim: Simulator, cs: AIOCloudStack) -> None:
    volume_id = await create(cs, sim, "r", gb=2)
    assert (await cs.resizeVolume(id=volume_id, size=4))["volume"]["size"] == 4 * GIB
    with pytest.raises(CloudStackApiException) as raised:
        await cs.resizeVolume(id=volume_id, size=1)
    assert raised.value.error["errorcode"] == 431 and "shrinkok" in raised.value.error["errortext"]
    assert (await cs.resizeVolume(id=volume_id, size=1, shrinkok=True))["volume"]["size"] == GIB
    # Beyond custom.diskoffering.size.max, as createVolume (it resized to 8 EiB before).
    with pytest.raises(CloudStackApiException) as raised:
        await cs.resizeVolume(id=volume_id, size=2**33)
    assert raised.value.error["errorcode"] == 431 and "out of allowed range" in str(raised.value)
    assert sim.volumes[volume_id].size == GIB
    assert await cs.deleteVolume(id=volume_id) == {"success": True}
    assert volume_id not in sim.volumes
    # CloudStack keeps the row of a deleted volume: listed by id it is simply not there.
    assert await cs.listVolumes(id=volume_id) == {}
    assert sim.mutations[volume_id] == 4  # create, 2 resizes, delete


async def test_maximum_data_disks() -> None:
    async with Simulator(SimConfig(seed=4, max_data_disks=2)) as sim, client(sim) as cs:
        vm = remote_vm(sim)
        for n in range(2):
            await cs.attachVolume(id=await create(cs, sim, f"d{n}"), virtualmachineid=vm)
        with pytest.raises(CloudStackApiException) as raised:
            await cs.attachVolume(id=await create(cs, sim, "d2"), virtualmachineid=vm)
        assert raised.value.error["errorcode"] == 431
        assert raised.value.error["errortext"] == (
            "The specified VM already has the maximum number of data disks (2) attached. "
            "Please specify another VM."
        )


async def test_guards(sim: Simulator, cs: AIOCloudStack) -> None:
    vm = remote_vm(sim)
    volume_id = await create(cs, sim)

    with pytest.raises(CloudStackApiException) as raised:
        await cs.detachVolume(id=volume_id)
    assert raised.value.error["errorcode"] == 431
    assert raised.value.error["cserrorcode"] == 4350
    assert raised.value.error["errortext"] == NOT_ATTACHED

    await cs.attachVolume(id=volume_id, virtualmachineid=vm)
    with pytest.raises(CloudStackApiException) as raised:
        await cs.attachVolume(id=volume_id, virtualmachineid=vm)
    assert raised.value.error["errorcode"] == 431
    assert raised.value.error["cserrorcode"] == 4350
    assert raised.value.error["errortext"] == ATTACHED

    with pytest.raises(CloudStackApiException) as raised:
        await cs.deleteVolume(id=volume_id)
    assert raised.value.response.status == 431
    assert raised.value.error == {
        "uuidList": [],
        "errorcode": 431,
        "cserrorcode": 4350,
        "errortext": ATTACHED,
    }
    assert sim.volumes[volume_id].vm_id == vm
    assert sim.mutations[volume_id] == 2  # create and the one attach


async def test_unknown_ids_are_431(sim: Simulator, cs: AIOCloudStack) -> None:
    unknown = str(uuid.uuid4())
    vm = remote_vm(sim)
    for command, params in [
        ("attachVolume", {"id": unknown, "virtualmachineid": vm}),
        ("detachVolume", {"id": unknown}),
        ("resizeVolume", {"id": unknown, "size": 2}),
        ("deleteVolume", {"id": unknown}),
        ("listVolumes", {"id": unknown}),
    ]:
        with pytest.raises(CloudStackApiException) as raised:
            await getattr(cs, command)(**params)
        assert raised.value.response.status == 431, command
        assert raised.value.error == {
            "uuidList": [],
            "errorcode": 431,
            "cserrorcode": 4350,
            "errortext": invalid_id(unknown),
        }, command
    volume_id = await create(cs, sim)
    with pytest.raises(CloudStackApiException) as raised:
        await cs.attachVolume(id=volume_id, virtualmachineid=unknown)
    assert raised.value.error["errortext"] == invalid_id(unknown, "virtualmachineid")


# -- jobs and faults ---------------------------------------------------------------------


async def test_job_latency(sim: Simulator, cs: AIOCloudStack) -> None:
    volume_id = await create(cs, sim)
    vm = remote_vm(sim)
    sim.set_latency(0.3, "attachVolume")
    started = await cs.attachVolume(id=volume_id, virtualmachineid=vm, fetch_result=False)
    pending = await cs.queryAsyncJobResult(jobid=started["jobid"], fetch_result=False)
    assert pending["jobstatus"] == 0 and pending["jobresultcode"] == 0
    assert "jobresult" not in pending
    listed = (await cs.listVolumes(id=volume_id))["volume"][0]
    assert "virtualmachineid" not in listed and listed["state"] == "Allocated"
    assert listed["jobid"] == started["jobid"]

    before = time.monotonic()
    await sim.wait_idle()
    assert time.monotonic() - before > 0.15
    done = await cs.queryAsyncJobResult(jobid=started["jobid"], fetch_result=False)
    assert done["jobstatus"] == 1 and done["jobresultcode"] == 0
    assert done["jobresulttype"] == "object"
    assert done["jobresult"]["volume"]["deviceid"] == 1
    assert done["cmd"].endswith(".AttachVolumeCmd") and done["created"]
    assert sim.volumes[volume_id].state == "Ready"

    # The default latency, set through the control API, applies to the other commands.
    await control(sim, "POST", "latency", {"seconds": 0.2})
    before = time.monotonic()
    await cs.detachVolume(id=volume_id)
    assert time.monotonic() - before >= 0.2


async def test_http_faults(sim: Simulator, cs: AIOCloudStack) -> None:
    sim.inject(kind="http", command="createVolume", status=503)
    with pytest.raises(CloudStackException) as raised:
        await create(cs, sim, "never")
    assert not isinstance(raised.value, CloudStackApiException)  # an HTML page, not an API error
    assert raised.value.response.status == 503

    sim.inject(Fault(kind="http", command="createVolume", status=503, json=True))
    with pytest.raises(CloudStackApiException) as api_raised:
        await create(cs, sim, "never")
    assert api_raised.value.error["errorcode"] == 503

    sim.inject(kind="http", command="createVolume", status=530)  # 53x: a CloudStack JSON error
    with pytest.raises(CloudStackApiException) as api_raised:
        await create(cs, sim, "never")
    assert api_raised.value.error["errorcode"] == 530
    assert not [v for v in sim.volumes.values() if v.name == "never"]
    await create(cs, sim, "now")


async def test_job_fault(sim: Simulator, cs: AIOCloudStack) -> None:
    volume_id = await create(cs, sim)
    sim.inject(kind="job", command="attachVolume")
    with pytest.raises(CloudStackApiException) as raised:
        await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
    assert raised.value.args[0] == "Job failure"
    assert raised.value.error["errorcode"] == 530
    assert "internal error" in raised.value.error["errortext"]
    assert sim.volumes[volume_id].vm_id is None
    [call] = [c for c in sim.calls if c.command == "attachVolume"]
    job = await cs.queryAsyncJobResult(jobid=call.jobid, fetch_result=False)
    assert job["jobstatus"] == 2 and job["jobresultcode"] == 530
    # A job fault waits for a call that starts a job: a refused one does not use it up.
    sim.inject(kind="job", command="attachVolume")
    with pytest.raises(CloudStackApiException) as refused:
        await cs.attachVolume(id=str(uuid.uuid4()), virtualmachineid=remote_vm(sim))
    assert refused.value.error["errorcode"] == 431
    with pytest.raises(CloudStackApiException):
        await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
    assert (await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim)))["volume"]


async def test_drop(sim: Simulator) -> None:
    async with client(sim, method="post") as cs:
        volume_id = await create(cs, sim)
        sim.inject(kind="drop", command="attachVolume")
        with pytest.raises(aiohttp.ClientConnectionError):
            await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
        await sim.wait_idle()
        assert sim.volumes[volume_id].vm_id is None
    # aiohttp re-sends an idempotent GET once when its connection drops: it takes two.
    async with client(sim) as cs:
        sim.inject(kind="drop", command="listZones", count=2)
        with pytest.raises(aiohttp.ClientConnectionError):
            await cs.listZones()
        assert [c.fault for c in sim.calls if c.command == "listZones"] == ["drop", "drop"]


async def test_accept_then_drop_applies_the_change(sim: Simulator) -> None:
    async with client(sim, method="post") as cs:
        volume_id = await create(cs, sim)
        sim.inject(kind="accept_then_drop", command="attachVolume")
        with pytest.raises(aiohttp.ClientConnectionError):
            await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
        await sim.wait_idle()
        assert sim.volumes[volume_id].vm_id == remote_vm(sim)
        listed = (await cs.listVolumes(id=volume_id))["volume"][0]
        assert listed["virtualmachineid"] == remote_vm(sim) and listed["deviceid"] == 1
        [call] = [c for c in sim.calls if c.command == "attachVolume"]
        assert call.status is None and call.fault == "accept_then_drop" and call.jobid


async def test_hang(sim: Simulator, cs: AIOCloudStack) -> None:
    sim.inject(kind="hang", command="listZones", seconds=0.3)
    before = time.monotonic()
    assert (await cs.listZones())["count"] == 1
    assert time.monotonic() - before >= 0.3
    # Without seconds it never answers; stopping the simulator closes the connection.
    sim.inject(kind="hang", command="listZones")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cs.listZones(), 0.2)
    before = time.monotonic()
    await sim.stop()
    assert time.monotonic() - before < 1.0


async def test_outage_fails_every_call_until_it_ends(sim: Simulator, cs: AIOCloudStack) -> None:
    fault = sim.inject(kind="http", status=503, json=True, lasting=0.5)
    for _ in range(3):
        with pytest.raises(CloudStackApiException):
            await cs.listZones()
    assert sim.faults.pending() == [fault]  # an outage is not used up by the calls it hits

    async def answered() -> bool:
        try:
            await cs.listZones()
        except CloudStackApiException:
            return False
        return True

    await wait_for(answered, 10)
    assert sim.faults.pending() == []


async def test_accept_then_hang_applies_before_it_answers(sim: Simulator) -> None:
    async with client(sim, method="post") as cs:
        sim.inject(kind="accept_then_hang", command="createVolume")  # until the simulator stops
        answer = asyncio.create_task(create(cs, sim, "slow"))
        await wait_for(lambda: any(v.name == "slow" for v in sim.volumes.values()), 10)
        assert not answer.done()
        answer.cancel()
        [call] = [c for c in sim.calls if c.command == "createVolume"]
        assert call.fault == "accept_then_hang"


async def test_faults_through_the_control_api(sim: Simulator, cs: AIOCloudStack) -> None:
    answer = await control(
        sim,
        "POST",
        "faults",
        [{"kind": "http", "status": 503, "json": True, "count": 2}, {"kind": "drop"}],
    )
    assert [f["kind"] for f in answer["faults"]] == ["http", "drop"]
    with pytest.raises(CloudStackApiException):
        await cs.listZones()
    assert (await control(sim, "GET", "faults"))["faults"][0]["count"] == 1
    await control(sim, "DELETE", "faults")
    assert (await cs.listZones())["count"] == 1
    sim.inject(kind="http", status=500)
    sim.clear_faults()
    assert (await cs.listZones())["count"] == 1

    await create(cs, sim, "before-reset")
    volumes = await control(sim, "GET", "volumes")
    assert "before-reset" in [v["name"] for v in volumes["volumes"]]
    await control(sim, "POST", "reset")
    assert "before-reset" not in [v.name for v in sim.volumes.values()]
    assert len(sim.volumes) == len(sim.vm_ids)  # the root disks
    assert len(sim.calls) == 0


# -- the call log ------------------------------------------------------------------------


async def test_call_log(sim: Simulator, cs: AIOCloudStack) -> None:
    volume_id = await create(cs, sim)
    await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
    await cs.detachVolume(id=volume_id)
    await cs.listVolumes(id=volume_id)
    commands = [c.command for c in sim.calls]
    assert commands.count("createVolume") == 1
    assert commands.count("attachVolume") == 1
    assert commands.count("detachVolume") == 1
    assert commands.count("listVolumes") == 1
    assert commands.count("queryAsyncJobResult") >= 3
    for call in sim.calls:
        assert not {"signature", "apiKey", "expires", "signatureVersion", "command"} & set(
            call.params
        )
        assert call.status == 200
    [attach] = [c for c in sim.calls if c.command == "attachVolume"]
    assert attach.params["id"] == volume_id and attach.jobid
    assert sim.mutations[volume_id] == 3

    logged = await control(sim, "GET", f"calls?command=attachVolume&id={volume_id}")
    assert logged["count"] == 1 and logged["calls"][0]["params"]["id"] == volume_id
    since = sim.calls[-1].seq
    await cs.listZones()
    later = await control(sim, "GET", f"calls?since={since}")
    assert [c["command"] for c in later["calls"]] == ["listZones"]


async def test_call_log_is_bounded() -> None:
    # (How fast the simulator answers is a benchmark's business, not a test's.)
    async with Simulator(SimConfig(seed=5, call_log_size=50)) as sim, client(sim) as cs:
        n = 2000
        await asyncio.gather(*(cs.listCapabilities() for _ in range(n)))
        assert len(sim.calls) == 50 and sim.calls[-1].seq == n


# -- hot-plug ----------------------------------------------------------------------------


def hotplug_config(tmp_path: Path, **over: Any) -> SimConfig:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (sysfs / "block" / "vda").mkdir(parents=True)  # the root disk
    (sysfs / "block" / "vda" / "size").write_text("16777216\n")
    dev.mkdir()
    return SimConfig(seed=6, sysfs_root=str(sysfs), dev_root=str(dev), **over)


def block_names(sim: Simulator) -> list[str]:
    assert sim.config.sysfs_root is not None
    return sorted(os.listdir(Path(sim.config.sysfs_root) / "block"))


async def test_the_guest_tree_has_its_block_directory_before_the_first_disk(
    tmp_path: Path,
) -> None:
    """README, "To try it by hand": the simulator on an empty --sysfs/--dev, then volumed.
    Without sys/block the watcher's start scan failed until the first disk appeared, and
    took that disk for one present before it started: a serial-less (xen) attach in
    flight then timed out instead of being proven."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    async with Simulator(SimConfig(seed=6, sysfs_root=str(sysfs), dev_root=str(dev))):
        assert (sysfs / "block").is_dir() and not os.listdir(sysfs / "block")
        assert dev.is_dir()


async def test_hotplug_with_serials(tmp_path: Path) -> None:
    async with Simulator(hotplug_config(tmp_path)) as sim, client(sim) as cs:
        sysfs, dev = tmp_path / "sys", tmp_path / "dev"
        local = sim.local_vm_id
        first, second, third = [await create(cs, sim, f"h{n}", gb=n + 1) for n in range(3)]

        await cs.attachVolume(id=first, virtualmachineid=local)
        await cs.attachVolume(id=second, virtualmachineid=local)
        assert block_names(sim) == ["vda", "vdb", "vdc"]
        vdb = sysfs / "block" / "vdb"
        assert (vdb / "size").read_text() == f"{GIB // 512}\n"
        serial = first.replace("-", "")[:20]
        assert (vdb / "serial").read_text() == serial
        assert (vdb / "device").is_symlink()
        assert (vdb / "device").resolve().name.startswith("virtio")
        assert (vdb / "device").resolve() != (sysfs / "block/vdc/device").resolve()
        assert (dev / "vdb").is_file() and (dev / "vdb").stat().st_size == 0
        link = dev / "disk" / "by-id" / f"virtio-{serial}"
        assert os.readlink(link) == "../../vdb" and link.resolve() == (dev / "vdb").resolve()
        assert sim.devices == {first: "vdb", second: "vdc"}
        assert not (sysfs / ".simulator").exists()

        # Remote VMs get no local device.
        await cs.attachVolume(id=third, virtualmachineid=remote_vm(sim))
        assert block_names(sim) == ["vda", "vdb", "vdc"]
        await cs.detachVolume(id=third)

        # Detach frees the letter; the next attach reuses it.
        await cs.detachVolume(id=first)
        assert block_names(sim) == ["vda", "vdc"]
        assert not (dev / "vdb").exists() and not link.is_symlink()
        await cs.attachVolume(id=third, virtualmachineid=local)
        assert block_names(sim) == ["vda", "vdb", "vdc"]
        assert (sysfs / "block/vdb/serial").read_text() == third.replace("-", "")[:20]
        assert (sysfs / "block/vdb/size").read_text() == f"{3 * GIB // 512}\n"
        assert os.readlink(dev / "disk/by-id" / f"virtio-{third.replace('-', '')[:20]}") == (
            "../../vdb"
        )

        # A resize shows in the size file.
        await cs.resizeVolume(id=third, size=5)
        assert (sysfs / "block/vdb/size").read_text() == f"{5 * GIB // 512}\n"


async def test_hotplug_without_serials_and_with_delays(tmp_path: Path) -> None:
    config = hotplug_config(tmp_path, serials=False, hotplug_delay=0.2, unplug_delay=0.2)
    async with Simulator(config) as sim, client(sim) as cs:
        sysfs, dev = tmp_path / "sys", tmp_path / "dev"
        volume_id = await create(cs, sim)
        await cs.attachVolume(id=volume_id, virtualmachineid=sim.local_vm_id)
        assert block_names(sim) == ["vda"]  # the job is done, the device not there yet
        await sim.wait_idle()
        assert block_names(sim) == ["vda", "vdb"]
        assert (sysfs / "block/vdb/size").read_text() == f"{GIB // 512}\n"
        assert not (sysfs / "block/vdb/serial").exists()
        assert (dev / "vdb").exists()
        assert not (dev / "disk" / "by-id").exists() or not os.listdir(dev / "disk" / "by-id")

        await cs.detachVolume(id=volume_id)
        assert block_names(sim) == ["vda", "vdb"]
        await sim.wait_idle()
        assert block_names(sim) == ["vda"] and not (dev / "vdb").exists()


def guest_tree(root: Path) -> tuple[Path, Path]:
    """A guest's sysfs and /dev with its root disk vda."""
    sysfs, dev = root / "sys", root / "dev"
    (sysfs / "block" / "vda").mkdir(parents=True)
    (sysfs / "block" / "vda" / "size").write_text("16777216\n")
    (dev / "disk" / "by-id").mkdir(parents=True)
    return sysfs, dev


async def test_several_guests_each_get_their_own_devices(tmp_path: Path) -> None:
    (a_sys, a_dev), (b_sys, b_dev) = guest_tree(tmp_path / "a"), guest_tree(tmp_path / "b")
    vm_a, vm_b, vm_c = (str(uuid.uuid4()) for _ in range(3))
    config = SimConfig(
        seed=12,
        vms=(VMConfig(id=vm_a), VMConfig(id=vm_b), VMConfig(id=vm_c)),
        sysfs_root=str(a_sys),
        dev_root=str(a_dev),
        guests=(GuestConfig(vm_id=vm_b, sysfs_root=str(b_sys), dev_root=str(b_dev)),),
    )
    async with Simulator(config) as sim, client(sim) as cs:
        assert sim.local_vm_id == vm_a  # the single-guest options are the first guest
        assert sim.guests == {vm_a: (str(a_sys), str(a_dev)), vm_b: (str(b_sys), str(b_dev))}
        one, two, three = [await create(cs, sim, f"g{n}") for n in range(3)]

        await cs.attachVolume(id=one, virtualmachineid=vm_a)
        await cs.attachVolume(id=two, virtualmachineid=vm_b)
        await cs.attachVolume(id=three, virtualmachineid=vm_c)  # no guest: no device anywhere
        # Each guest's kernel names its own disks: both hot-plugs are vdb, in their own trees.
        assert sim.devices_of(vm_a) == {one: "vdb"} == sim.devices
        assert sim.devices_of(vm_b) == {two: "vdb"}
        assert sim.devices_of(vm_c) == {}
        assert (a_sys / "block/vdb/serial").read_text() == one.replace("-", "")[:20]
        assert (b_sys / "block/vdb/serial").read_text() == two.replace("-", "")[:20]
        assert os.readlink(b_dev / "disk/by-id" / f"virtio-{two.replace('-', '')[:20]}") == (
            "../../vdb"
        )
        assert not (a_dev / "disk/by-id" / f"virtio-{two.replace('-', '')[:20]}").exists()
        assert sorted(os.listdir(b_sys / "block")) == ["vda", "vdb"]

        # Moving a volume from one guest to the other moves its device.
        await cs.detachVolume(id=one)
        await cs.attachVolume(id=one, virtualmachineid=vm_b)
        assert sim.devices_of(vm_a) == {}
        assert sim.devices_of(vm_b) == {two: "vdb", one: "vdc"}
        assert sorted(os.listdir(a_sys / "block")) == ["vda"] and not (a_dev / "vdb").exists()
        assert sim.plugged_into(vm_a) == [(one, "vdb")]
        assert sim.plugged_into(vm_b) == [(two, "vdb"), (one, "vdc")]
        assert sim.plugged_into(vm_c) == []

        world = await control(sim, "GET", "world")
        assert world["guests"] == [
            {"vm_id": vm_a, "sysfs": str(a_sys), "dev": str(a_dev)},
            {"vm_id": vm_b, "sysfs": str(b_sys), "dev": str(b_dev)},
        ]
        volumes = await control(sim, "GET", "volumes")
        assert volumes["guest_devices"] == {vm_a: {}, vm_b: {two: "vdb", one: "vdc"}}

        sim.reset()
        assert sorted(os.listdir(b_sys / "block")) == ["vda"]


async def test_guests_without_ids_take_the_vms_in_order(tmp_path: Path) -> None:
    (a_sys, a_dev), (b_sys, b_dev) = guest_tree(tmp_path / "a"), guest_tree(tmp_path / "b")
    only_guests = SimConfig(
        seed=13,
        guests=(
            GuestConfig(sysfs_root=str(a_sys), dev_root=str(a_dev)),
            GuestConfig(sysfs_root=str(b_sys), dev_root=str(b_dev)),
        ),
    )
    async with Simulator(only_guests) as sim:
        first, second, _ = sim.vm_ids
        assert list(sim.guests) == [first, second] and sim.local_vm_id == first

    with pytest.raises(ValueError, match="two guests"):
        Simulator(SimConfig(seed=13, guests=(GuestConfig(vm_id=first), GuestConfig(vm_id=first))))
    with pytest.raises(ValueError, match="not one of the configured VMs"):
        Simulator(SimConfig(seed=13, guests=(GuestConfig(vm_id="no-such-vm"),)))


async def test_call_log_counts_the_mutations_of_each_volume(
    sim: Simulator, cs: AIOCloudStack
) -> None:
    volume_id = await create(cs, sim, "counted")
    other = await create(cs, sim, "other")
    await cs.attachVolume(id=volume_id, virtualmachineid=remote_vm(sim))
    with pytest.raises(CloudStackApiException):  # accepted, then its job fails
        await cs.attachVolume(id=volume_id, virtualmachineid=sim.vm_ids[0])
    with pytest.raises(CloudStackApiException):  # refused at once (431): never accepted
        await cs.attachVolume(id=volume_id, virtualmachineid="no-such-vm")
    await cs.detachVolume(id=volume_id)
    await cs.listVolumes(id=volume_id)
    await cs.deleteVolume(id=volume_id)

    made = sim.call_log.mutations(volume_id)
    assert [c.command for c in made] == [
        "createVolume",
        "attachVolume",
        "attachVolume",  # accepted; its job then failed (already attached): still sent
        "detachVolume",
        "deleteVolume",
    ]
    assert made[0].params["name"] == "counted" and made[0].volume_id == volume_id
    assert [c.volume_id for c in sim.call_log.mutations(other)] == [other]
    assert len(sim.call_log.mutations()) == 6
    refused = sim.call_log.select("attachVolume", virtualmachineid="no-such-vm")
    assert len(refused) == 1 and not refused[0].accepted

    logged = await control(sim, "GET", f"mutations?volume_id={volume_id}")
    assert [c["command"] for c in logged["calls"]] == [c.command for c in made]


# -- running as a process ----------------------------------------------------------------


async def test_process_mode_prints_its_json_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulator",
        "--port",
        "0",
        "--seed",
        "9",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        ready = json.loads(line)
        assert {"endpoint", "key", "secret", "zone_id", "disk_offering_ids", "vm_ids"} <= set(ready)
        assert ready["guests"] == []  # no --sysfs, --dev or --guest: no device tree
        assert ready["endpoint"].endswith("/client/api")
        async with AIOCloudStack(
            endpoint=ready["endpoint"], key=ready["key"], secret=ready["secret"]
        ) as cs:
            zones = await cs.listZones()
        assert zones["zone"][0]["id"] == ready["zone_id"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_refuses_bad_config(tmp_path: Path) -> None:
    assert cli_main(["--config", str(tmp_path / "missing.toml")]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    assert cli_main(["--config", str(bad)]) == 2


def test_cli_guests(tmp_path: Path) -> None:
    from simulator.cli import _parser, build_config

    args = _parser().parse_args(
        ["--sysfs", "/a/sys", "--dev", "/a/dev", "--guest", "vm-b:/b/sys:/b/dev", "--guest", "::"]
    )
    config = build_config(args)
    assert (config.sysfs_root, config.dev_root) == ("/a/sys", "/a/dev")
    assert config.guests == (
        GuestConfig(vm_id="vm-b", sysfs_root="/b/sys", dev_root="/b/dev"),
        GuestConfig(),
    )
    toml = tmp_path / "sim.toml"
    toml.write_text('[[guests]]\nvm_id = "vm-x"\nsysfs_root = "/x/sys"\n')
    assert build_config(_parser().parse_args(["--config", str(toml)])).guests == (
        GuestConfig(vm_id="vm-x", sysfs_root="/x/sys"),
    )
    with pytest.raises(SystemExit):
        _parser().parse_args(["--guest", "vm-only"])
