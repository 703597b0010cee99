"""Every example in README.md and docs/ is named and checked: shell commands against the real parsers and
Makefile, recipe snippets through the recipe-file parser, Python blocks by the tests that run them."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex

import pytest
import yaml

from doc_examples import ROOT, RUNNABLE, Example, all_blocks, examples, split_commands

TESTS = ROOT / "tests"
_REFERENCE = re.compile(r"""(?:example|run_python|commands|_after_setup)\(\s*["']([a-z0-9][a-z0-9-]*)["']""")


def _by_language(language: str) -> list[Example]:
    return [block for block in examples().values() if block.language == language]


def test_every_runnable_block_carries_a_name() -> None:
    unnamed = [b.where() for b in all_blocks() if b.language in RUNNABLE and b.name is None]
    assert not unnamed, f"add '<!-- example: NAME -->' above each of these blocks: {unnamed}"
    untagged = [b.where() for b in all_blocks() if not b.language]
    assert not untagged, f"give these blocks a language (text for output): {untagged}"


def test_every_python_example_is_run_by_a_test() -> None:
    referenced = {name for path in TESTS.glob("test_*.py") for name in _REFERENCE.findall(path.read_text())}
    missing = [b.where() + f" ({b.name})" for b in _by_language("python") if b.name not in referenced]
    assert not missing, f"no test runs these Python examples: {missing}"


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.M))


def _check_parses(parser, words: list[str], program: str) -> None:
    try:
        parser.parse_args(words)
    except SystemExit as exit_:
        raise AssertionError(f"`{program} {shlex.join(words)}` does not parse (exit {exit_.code})") from None


def _check_vitsparse(words: list[str]) -> None:
    from vitsparse.bench.cli import build_parser

    _check_parses(build_parser(), words, "vitsparse")


def _check_runtime(words: list[str]) -> None:
    from vitsparse.runtime.__main__ import build_parser

    _check_parses(build_parser(), words, "python -m vitsparse.runtime")


def _check_python_code(code: str) -> None:
    """A `python -c` program compiles and every name it imports from vitsparse exists."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitsparse"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def _check_python(words: list[str]) -> None:
    if words[0] == "-c":
        return _check_python_code(words[1])
    assert words[0] == "-m", f"python {shlex.join(words)}: only -m and -c are checked"
    module, rest = words[1], words[2:]
    if module == "vitsparse.runtime":
        return _check_runtime(rest)
    if module == "vitsparse.bench.cli":
        return _check_vitsparse(rest)
    assert importlib.util.find_spec(module) is not None, f"no module {module}"


def check_command(words: list[str]) -> None:
    """Checks one documented command without running it."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value assignments
        words = words[1:]
    program, rest = words[0], words[1:]
    if program == "vitsparse":
        _check_vitsparse(rest)
    elif program == "make":
        targets = [w for w in rest if "=" not in w and not w.startswith("-")]
        unknown = set(targets) - _makefile_targets()
        assert not unknown, f"the Makefile has no target {sorted(unknown)}"
    elif program.endswith("python") or program.endswith("python3"):
        _check_python(rest)
    elif program == "torchrun":
        module = rest.index("-m")
        _check_python(rest[module:])
    elif program == "pip":
        for path in (w for w in rest if w.endswith(".txt")):
            assert (ROOT / path).is_file(), f"no requirement file {path}"
    elif program in {"curl", "bash", "cd", "git", "wc"}:
        return  # run by the tests named in the example's page (serving, CI), not parsed here
    else:
        raise AssertionError(f"no check for `{program}`: add one to tests/test_docs.py")


@pytest.mark.parametrize("name", sorted(b.name for b in _by_language("bash")))
def test_shell_example_parses(name: str) -> None:
    block = examples()[name]
    for words in split_commands(block.code):
        try:
            check_command(words)
        except AssertionError as err:
            raise AssertionError(f"{block.where()} ({name}): {err}") from None


@pytest.mark.parametrize("name", sorted(b.name for b in _by_language("yaml")))
def test_yaml_example_parses(name: str) -> None:
    """YAML examples parse; those named recipe-* are checked as recipe files (a whole file or its stages)."""
    from vitsparse.bench.plan import parse_plan

    block = examples()[name]
    data = yaml.safe_load(block.code)
    if not name.startswith("recipe"):
        assert data is not None
    elif isinstance(data, dict) and "stages" in data:
        parse_plan(data, source=block.where())
    else:  # a fragment: a list of stages, or one stage
        stages = data if isinstance(data, list) else [data]
        parse_plan({"stages": stages}, source=block.where())


def test_check_command_catches_a_stale_flag() -> None:
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(["vitsparse", "serve", "art", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no target"):
        check_command(["make", "no-such-target"])
