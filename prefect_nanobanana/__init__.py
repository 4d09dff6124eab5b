"""prefect-nanobanana: Nano Banana Pro image edits on the RunComfy Model API, as Prefect steps.

The client layer is imported eagerly (it is light); the Prefect layer is imported
on first use, so `nanobanana --help` and plain client users do not pay for
importing Prefect.
"""

from __future__ import annotations

import importlib
from typing import Any

from .client import *  # noqa: F403
from .client import __all__ as _client_names

__version__ = "0.1.0"

# Public name -> module that defines it; imported on first attribute access.
_LAZY_EXPORTS: dict[str, str] = {}

__all__ = [*_client_names, *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})
