"""Prefect blocks: what a deployment saves once and loads by name.

- `credentials.py`: `RunComfyCredentials`, the one place a deployment keeps its API
  token, and how a flow's `credentials` parameter becomes a block.
- `jobs.py`: `NanoBananaEditJob` (a saved edit, triggered) and its `NanoBananaEditJobRun`.
"""

from .._lazy import lazy_exports

# Read by the command line without importing Prefect (see `cli/connection.py`).
CREDENTIALS_BLOCK_TYPE_SLUG = "runcomfy-credentials"

_EXPORTS: dict[str, str] = {
    "RunComfyCredentials": ".credentials",
    "NanoBananaEditJob": ".jobs",
    "NanoBananaEditJobRun": ".jobs",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
