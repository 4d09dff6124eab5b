"""PEP 562 lazy exports, so importing a package costs only what is used.

`nanobanana --help` must not import httpx, pydantic or Prefect; users still write
`from prefect_nanobanana import RunComfyClient`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, resolving `exports` (name -> module)."""

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name, package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
