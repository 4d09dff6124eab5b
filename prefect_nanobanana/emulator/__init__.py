"""A RunComfy Model API emulator on loopback, for the demo, tests, benchmarks and offline work.

It speaks the contract in the project's API notes (statuses, errors, cancel,
pricing, output pixel sizes) with real HTTP, real images and injectable faults,
and it knows nothing of the client's internals or of Prefect: the only shared
code is the API's vocabulary and input model.

    from prefect_nanobanana.emulator import EmulatorConfig, EmulatorServer, FaultPlan

    with EmulatorServer(EmulatorConfig(time_scale=0.01)) as emulator:
        ...  # point a client at emulator.base_url with the token "test-token"
"""

from .config import EmulatorConfig
from .faults import Fault, FaultPlan
from .jobs import JobInfo
from .server import EmulatorServer
from .stats import EmulatorStats, RequestCalls

__all__ = [
    "EmulatorConfig",
    "EmulatorServer",
    "EmulatorStats",
    "Fault",
    "FaultPlan",
    "JobInfo",
    "RequestCalls",
]
