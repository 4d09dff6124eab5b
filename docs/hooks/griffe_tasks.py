"""Griffe extension: document the tasks that `sync_and_async_tasks` makes, under their names.

`submit_edit, asubmit_edit = sync_and_async_tasks(_submit_edit_once, ...)` exists only at
run time, so static analysis sees no `submit_edit`. For each such assignment this adds
the two public names to the module, with the body's signature and docstring, labelled
`task` (and `async` for the `a*` twin): the API reference then shows what users call.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class SyncAndAsyncTasks(griffe.Extension):
    """Adds the task pairs of every module that builds them with `sync_and_async_tasks`."""

    def on_module_members(self, *, mod: griffe.Module, **_: Any) -> None:
        if "sync_and_async_tasks(" not in (mod.source if mod.filepath else ""):
            return
        for node in ast.parse(mod.source).body:
            pair = _task_pair(node)
            if pair is None:
                continue
            (sync_name, async_name), body_name = pair
            body = mod.members.get(body_name)
            if not isinstance(body, griffe.Function):
                continue
            for name, labels in ((sync_name, {"task"}), (async_name, {"task", "async"})):
                task = griffe.Function(
                    name,
                    lineno=node.lineno,
                    endlineno=node.end_lineno,
                    parameters=body.parameters,
                    returns=body.returns,
                    docstring=body.docstring,
                )
                task.labels |= labels
                mod.set_member(name, task)


def _task_pair(node: ast.stmt) -> tuple[tuple[str, str], str] | None:
    """((sync name, async name), body name) of `a, b = sync_and_async_tasks(_body, ...)`."""
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
        return None
    call, (target, *_) = node.value, node.targets
    if not (isinstance(call.func, ast.Name) and call.func.id == "sync_and_async_tasks"):
        return None
    if not (isinstance(target, ast.Tuple) and len(target.elts) == 2 and call.args):
        return None
    names = [element.id for element in target.elts if isinstance(element, ast.Name)]
    if len(names) != 2 or not isinstance(call.args[0], ast.Name):
        return None
    return (names[0], names[1]), call.args[0].id
