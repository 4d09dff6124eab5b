"""The documentation cannot drift from the code: the CLI page lists exactly the parser's
verbs, options and exit codes, and the API reference names every public name."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CLI_PAGE = DOCS / "cli.md"
_SECTION = re.compile(r"^## `nanobanana (\w+)`\n(.*?)(?=^## |\Z)", re.M | re.S)
_ROW = re.compile(r"^\| `([^`]+)`", re.M)


def _documented_verbs() -> dict[str, set[str]]:
    """Verb -> the options and arguments its table lists (`--out DIR` -> `--out`)."""
    return {
        verb: {cell.split()[0] for cell in _ROW.findall(body)}
        for verb, body in _SECTION.findall(CLI_PAGE.read_text())
    }


def _parsed(parser: argparse.ArgumentParser) -> set[str]:
    """What a person can type to a parser: long options and positional arguments."""
    names: set[str] = set()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            names.add(max(action.option_strings, key=len))
        else:
            names.add(action.dest.upper())
    return names


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    from prefect_nanobanana.cli import build_parser
    from prefect_nanobanana.emulator.__main__ import build_parser as build_emulator_parser

    (verbs,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    # `emulator` is listed by the main parser for --help only; its own parser has the options.
    return {**verbs.choices, "emulator": build_emulator_parser()}


def test_the_cli_page_has_a_section_for_every_verb_and_no_other():
    assert set(_documented_verbs()) == set(_verb_parsers())


@pytest.mark.parametrize("verb", sorted(_verb_parsers()))
def test_the_cli_page_lists_every_option_of_each_verb(verb):
    assert _documented_verbs()[verb] == _parsed(_verb_parsers()[verb])


def test_the_cli_page_lists_every_exit_code():
    from prefect_nanobanana.cli import exit_codes

    codes = {
        name: value
        for name, value in vars(exit_codes).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    section = CLI_PAGE.read_text().split("## Exit codes", 1)[1]
    documented = {
        name: int(code) for code, name in re.findall(r"^\| (\d+) \| `(EXIT_\w+)` \|", section, re.M)
    }
    assert documented == codes


def _public_names() -> dict[str, list[str]]:
    import prefect_nanobanana
    from prefect_nanobanana import blocks, client, flows, tasks

    return {
        module.__name__: list(module.__all__)
        for module in (prefect_nanobanana, blocks, client, flows, tasks)
    }


def test_the_api_reference_names_every_public_name():
    directives = "\n".join(page.read_text() for page in (DOCS / "reference").glob("*.md"))
    documented = {line.rsplit(".", 1)[-1] for line in re.findall(r"^::: (\S+)", directives, re.M)}
    missing = {module: sorted(set(names) - documented) for module, names in _public_names().items()}
    assert not any(missing.values()), missing


def test_every_api_reference_directive_names_an_object_where_it_is_defined():
    """A name moved to another module fails here, not only in `mkdocs build`; and a
    directive for a function names its module, so a submodule of the same name (the
    `edit_and_archive` flow in `flows/edit_and_archive.py`) cannot take its place."""
    import importlib
    import inspect

    for page in (DOCS / "reference").glob("*.md"):
        for path in re.findall(r"^::: (\S+)", page.read_text(), re.M):
            module_name, _, name = path.rpartition(".")
            if page.name == "root.md" and path == "prefect_nanobanana":
                continue  # the package itself
            module = importlib.import_module(module_name)
            assert name in vars(module), f"{page.name}: {path} is not defined there"
            obj = vars(module)[name]
            assert not inspect.ismodule(obj), f"{page.name}: {path} is a module"
            defined_in = getattr(getattr(obj, "fn", obj), "__module__", module_name)
            if inspect.isclass(obj) or inspect.isfunction(getattr(obj, "fn", obj)):
                assert defined_in == module_name, f"{page.name}: {path}: use {defined_in}.{name}"
