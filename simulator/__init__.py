"""A CloudStack API simulator for tests, benchmarks and demos, driven by the real ``cs`` client.

``async with Simulator(SimConfig(job_latency=0.2)) as sim:``, then ``sim.client()`` (a real
``cs.AIOCloudStack``) or any client given ``sim.url``, ``sim.api_key`` and ``sim.secret_key``.
"""

from simulator.calllog import Call, CallLog
from simulator.config import DiskOfferingConfig, GuestConfig, SimConfig, VMConfig, load_config
from simulator.faults import Fault, FaultKind
from simulator.server import Simulator
from simulator.world import ApiError, Volume

__all__ = [
    "ApiError",
    "Call",
    "CallLog",
    "DiskOfferingConfig",
    "Fault",
    "FaultKind",
    "GuestConfig",
    "SimConfig",
    "Simulator",
    "VMConfig",
    "Volume",
    "load_config",
]
