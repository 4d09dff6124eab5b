"""The house: which room may import what, and the public names users rely on.

Each check runs in a fresh interpreter, because this test process has long
imported Prefect for the other tests.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

FOREIGN = ("prefect", "prefect_aws")


def imported_after(code: str) -> list[str]:
    """The top-level packages in `sys.modules` after running `code` in a new interpreter."""
    probe = (
        code
        + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(answer.stdout.strip().splitlines()[-1])


def every_module_of(package: str) -> str:
    """Code that imports every module of `package` and resolves every lazy export."""
    return (
        "import importlib, pkgutil\n"
        f"package = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "for name in package.__all__:\n"
        "    getattr(package, name)\n"
    )


@pytest.mark.parametrize("room", ["prefect_nanobanana.client", "prefect_nanobanana.storage"])
def test_client_and_storage_import_nothing_of_prefect(room: str) -> None:
    modules = imported_after(every_module_of(room))
    assert room.split(".")[0] in modules  # the probe did import the room
    assert not [name for name in modules if name in FOREIGN]


@pytest.mark.parametrize("room", ["prefect_nanobanana.guard", "prefect_nanobanana.stop"])
def test_the_guard_and_the_stop_import_nothing_of_prefect(room: str) -> None:
    probe = every_module_of(room) if room.endswith("guard") else f"import {room}"
    modules = imported_after(probe)
    assert not [name for name in modules if name in FOREIGN]


def test_the_emulator_imports_nothing_of_prefect() -> None:
    modules = imported_after(every_module_of("prefect_nanobanana.emulator"))
    assert not [name for name in modules if name in FOREIGN]


def test_the_command_line_starts_without_prefect() -> None:
    modules = imported_after("from prefect_nanobanana.cli import build_parser; build_parser()")
    assert not [name for name in modules if name in FOREIGN]


def _calls_of(names: set[str]) -> dict[str, set[str]]:
    """Which of `names` each module of the package calls (or, for a class, makes)."""
    import ast
    from pathlib import Path

    import prefect_nanobanana

    root = Path(prefect_nanobanana.__file__).parent
    found: dict[str, set[str]] = {name: set() for name in names}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = node.func
                name = (
                    called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
                )
                if name in names:
                    found[name].add(module.removesuffix(".__init__"))
    return found


def test_the_step_sequence_is_written_once() -> None:
    """Submit → wait → archive is `Pipeline.run`: the guard's paid submit is called by the
    pipeline alone, and every surface that edits or submits makes a `Pipeline` rather
    than composing the steps."""
    calls = _calls_of({"submit_once", "Pipeline"})
    assert calls["submit_once"] == {"prefect_nanobanana.pipeline"}
    assert calls["Pipeline"] == {
        "prefect_nanobanana.flows.batch.flow",  # every batch row
        "prefect_nanobanana.flows.edit",  # edit_image, edit_and_archive
        "prefect_nanobanana.tasks.requests",  # submit_edit, NanoBananaEditJob.trigger
        "prefect_nanobanana.cli.edit",
        "prefect_nanobanana.cli.requests",  # `nanobanana submit`
    }


def test_public_names_resolve_where_the_readme_documents_them() -> None:
    import prefect_nanobanana
    from prefect_nanobanana import blocks, tasks
    from prefect_nanobanana.cli import main

    assert prefect_nanobanana.RunComfyCredentials is blocks.RunComfyCredentials
    assert prefect_nanobanana.NanoBananaEditJob is blocks.NanoBananaEditJob
    assert callable(tasks.archive_request) and callable(tasks.submit_edit)
    assert callable(main) and callable(prefect_nanobanana.batch_edit)
    # One path per module: the layouts of before the first release are not kept.
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("prefect_nanobanana.storage_tasks")


def test_every_error_the_package_raises_derives_from_one_root() -> None:
    """`except NanoBananaError` catches any of ours; each class keeps its older bases."""
    import inspect
    import pkgutil

    import prefect_nanobanana
    from prefect_nanobanana import NanoBananaError, RunComfyError

    errors = []
    for info in pkgutil.walk_packages(prefect_nanobanana.__path__, "prefect_nanobanana."):
        if info.name.endswith(".__main__"):
            continue  # runs a program when imported
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                errors.append(value)
    # Control flow kept inside one module (caught where it is raised) is not raised at users.
    internal = {"AnswerTooLarge"}
    strays = [e.__qualname__ for e in errors if not issubclass(e, NanoBananaError)]
    assert sorted(set(strays) - internal) == []
    assert issubclass(RunComfyError, Exception) and len(errors) > 20
