"""The documentation cannot drift: the site builds with ``mkdocs build --strict`` (a broken link,
anchor or missing page fails), docs/cli.md documents exactly the options ``clbench`` parses, the
README's relative links resolve, and every method's deviations live on its family page rather
than in its module docstring."""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
FAMILIES = ("lora", "prompt", "prototype", "reference", "slow_learner")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from clbench.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def parsed_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser (parent parsers' included), except -h/--help."""
    return {option for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


def documented_options(text: str) -> dict[str, set[str]]:
    """{command: options} from docs/cli.md: a ``## `` section whose heading names
    `clbench <command>` documents, in the first cell of its table rows, options of that command
    (a section naming several commands documents options they share)."""
    documented: dict[str, set[str]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        options = set(re.findall(r"^\|\s*`(-{1,2}[\w-]+)", body, flags=re.M))
        for command in re.findall(r"`clbench (\w+)`", heading):
            documented.setdefault(command, set()).update(options)
    return documented


def test_every_command_and_option_is_documented_and_nothing_else():
    documented = documented_options(CLI_DOC.read_text())
    commands = subcommands()
    assert set(documented) == set(commands), "docs/cli.md needs one section per command"
    for name, parser in commands.items():
        missing = parsed_options(parser) - documented[name]
        extra = documented[name] - parsed_options(parser)
        assert not missing, f"clbench {name}: options not documented in docs/cli.md: {sorted(missing)}"
        assert not extra, f"clbench {name}: docs/cli.md documents options it lacks: {sorted(extra)}"


def test_every_option_mentioned_in_the_cli_page_exists():
    known = {"--help"}.union(*(parsed_options(p) for p in subcommands().values()))
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", CLI_DOC.read_text()))
    assert not mentioned - known, f"docs/cli.md mentions unknown options: {sorted(mentioned - known)}"


def test_documentation_check_sees_a_new_undocumented_flag(monkeypatch):
    """The check above is not vacuous: a flag added to the parser without docs fails it."""
    import clbench.cli

    original = clbench.cli.build_parser

    def with_extra_flag():
        parser = original()
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        action.choices["run"].add_argument("--undocumented-flag", action="store_true")
        return parser

    monkeypatch.setattr(clbench.cli, "build_parser", with_extra_flag)
    with pytest.raises(AssertionError, match="undocumented-flag"):
        test_every_command_and_option_is_documented_and_nothing_else()


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "methods" / "lora" / "index.html").is_file()


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to a missing file: {target}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160


def module_docstrings():
    for path in sorted((ROOT / "methods").rglob("*.py")):
        yield path, ast.get_docstring(ast.parse(path.read_text())) or ""


def test_method_modules_point_to_their_family_page_and_hold_no_deviation_list():
    registering = 0
    for path, doc in module_docstrings():
        family = path.relative_to(ROOT / "methods").parts[0]
        if "@register_method(" in path.read_text():  # a module that defines methods
            registering += 1
            assert f"docs/methods/{family}.md" in doc, f"{path}: link docs/methods/{family}.md"
        assert not re.search(r"^\s*Deviations?\b", doc, flags=re.M), \
            f"{path}: deviations belong on docs/methods/{family}.md"
    assert registering >= 10
    for family in FAMILIES:
        assert (ROOT / "docs" / "methods" / f"{family}.md").is_file()


def test_every_built_in_method_is_listed_in_the_readme_the_overview_and_its_family_page():
    """A new method cannot land undocumented: its registered name appears (in backticks) in the
    README's methods table, the methods overview and the page of the family folder it lives in."""
    import inspect

    from clbench.registry import METHODS

    readme = (ROOT / "README.md").read_text()
    overview = (ROOT / "docs" / "methods" / "index.md").read_text()
    for name in METHODS.builtin_names():
        source = Path(inspect.getfile(METHODS.get(name))).resolve()
        family = source.relative_to((ROOT / "methods").resolve()).parts[0]
        page = (ROOT / "docs" / "methods" / f"{family}.md").read_text()
        for where, text in (("README.md", readme), ("docs/methods/index.md", overview),
                            (f"docs/methods/{family}.md", page)):
            assert f"`{name}`" in text, f"{name} is not listed in {where}"
