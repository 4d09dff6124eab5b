"""Every public name has a docstring that says how to call it: the API reference is
generated from them (docs/reference/), and users read it before the code.

Public: the names in `__all__` of the package root, `blocks`, `client`, `tasks` and
`flows`, and the public methods of their classes. A callable that takes parameters
documents them under `Args:`; one that returns something says what under `Returns:`.
Constants and type aliases carry no runtime docstring and are documented on their pages.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest

MODULES = [
    "prefect_nanobanana",
    "prefect_nanobanana.blocks",
    "prefect_nanobanana.client",
    "prefect_nanobanana.tasks",
    "prefect_nanobanana.flows",
]
# Methods every pydantic model or Prefect block has: documented by pydantic and Prefect.
_INHERITED_FROM = ("pydantic", "prefect.", "builtins", "typing", "enum", "abc")


def _function(obj: Any) -> Any:
    """The Python function behind a Prefect task or flow, else the object itself."""
    return getattr(obj, "fn", obj)


def _public_objects() -> Iterator[tuple[str, Any]]:
    import importlib

    seen: set[int] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                yield f"{module_name}.{name}", obj
                for method_name, method in vars(obj).items():
                    if method_name.startswith("_") and method_name != "__init__":
                        continue
                    function = getattr(method, "__func__", method)
                    if inspect.isfunction(function) and not _inherited(function):
                        yield f"{module_name}.{name}.{method_name}", function
            elif inspect.isfunction(_function(obj)):  # functions, tasks and flows
                yield f"{module_name}.{name}", _function(obj)


def _inherited(function: Any) -> bool:
    return (function.__module__ or "").startswith(_INHERITED_FROM)


def _parameters(function: Any) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [
        name
        for name, parameter in signature.parameters.items()
        if name not in ("self", "cls")
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def _returns_something(function: Any) -> bool:
    annotation = inspect.signature(function).return_annotation
    return annotation not in (inspect.Signature.empty, None, "None")


PUBLIC = dict(_public_objects())


def _protocol_doc(name: str) -> str | None:
    """The docstring of the method a store implements, from the public protocol it
    satisfies (`MemoryRecordStore.read` is documented as `RecordStore.read`)."""
    owner, _, method = name.rpartition(".")
    cls = PUBLIC.get(owner)
    for protocol in PUBLIC.values():
        if not (inspect.isclass(protocol) and getattr(protocol, "_is_protocol", False)):
            continue
        members = [member for member in vars(protocol) if not member.startswith("_")]
        if cls is not protocol and method in members and all(hasattr(cls, m) for m in members):
            return inspect.getdoc(getattr(protocol, method))
    return None


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_a_public_name_has_a_docstring_with_its_args_and_returns(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or _protocol_doc(name) or ""
    assert doc.strip(), f"{name} has no docstring"
    if inspect.isclass(obj) or name.endswith(".__init__"):
        return
    missing = []
    if _parameters(obj) and "Args:" not in doc:
        missing.append("Args:")
    if _returns_something(obj) and "Returns:" not in doc and "Yields:" not in doc:
        missing.append("Returns:")
    assert not missing, f"{name}'s docstring lacks {', '.join(missing)}"
