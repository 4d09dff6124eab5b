"""PEP 562 lazy exports, so importing a package costs only what is used; old module paths.

`nanobanana --help` must not import httpx, pydantic or Prefect; users still write
`from prefect_nanobanana import RunComfyClient`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
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


class _ModuleAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import old.path` give the module object that now lives at a new path.

    The very same object, not a copy: a user's monkeypatch or `isinstance` through
    the old path acts on the real module.
    """

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases  # old full name -> new full name
        self.real_specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.aliases:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(self.aliases[spec.name])
        self.real_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the real module: give it back its own.
        module.__spec__ = self.real_specs[module.__name__]


def alias_modules(package: str, aliases: dict[str, str]) -> None:
    """Let the old module paths `package.<old>` resolve to `package.<new>` (imported on use)."""
    sys.meta_path.append(
        _ModuleAlias({f"{package}.{old}": f"{package}.{new}" for old, new in aliases.items()})
    )
