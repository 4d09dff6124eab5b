"""The offline room: stand-ins on loopback for the two services a run talks to.

- `EmulatorServer`: the RunComfy Model API, for the demo, tests, benchmarks and offline work.
- `LoopbackObjectStore`: an object store with pre-signed GET URLs, the stand-in for S3
  staging (the storage room's staging code is its client).

The emulator speaks the contract in the project's API notes (statuses, errors, cancel,
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
from .object_store import LoopbackObjectStore
from .server import EmulatorServer
from .stats import EmulatorStats, RequestCalls

__all__ = [
    "EmulatorConfig",
    "EmulatorServer",
    "EmulatorStats",
    "Fault",
    "FaultPlan",
    "JobInfo",
    "LoopbackObjectStore",
    "RequestCalls",
]
