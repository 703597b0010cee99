"""The reference pages stay true to the code: docs/recipes.md names every stage and key,
docs/results-schema.md every field of a row, and every file, test and function the pages cite exists."""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest

from doc_examples import ROOT

DOCS = ROOT / "docs"
REFERENCE_PAGES = ("design.md", "recipes.md", "results-schema.md")
_FOLDERS = "models|compiler|pruners|runtime|bench|kernels|recipes|tests|docs"
_PATH = re.compile(rf"`((?:{_FOLDERS})/[\w./-]+\.(?:py|md|sh|yaml))")
_TEST_FILE = re.compile(r"`?(test_\w+\.py)(?:::(\w+))?")


def _text(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def test_the_recipes_page_documents_every_stage_and_key() -> None:
    from vitsparse.bench.plan import PlanSettings
    from vitsparse.bench.stages import STAGES

    text = _text("recipes.md")
    for field in dataclasses.fields(PlanSettings):
        assert f"| `{field.name}` |" in text, field.name
    for kind, cls in STAGES.items():
        assert f"| `{kind}` |" in text, kind
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in text, (kind, field.name)


def test_the_recipes_page_names_every_recorded_pass() -> None:
    import vitsparse.pruners  # noqa: F401  (registers every pass)
    from vitsparse.compiler import PASS_REGISTRY

    text = _text("recipes.md")
    ours = [name for name, cls in PASS_REGISTRY.items() if cls.__module__.startswith("vitsparse.")]
    missing = [name for name in ours if f'"{name}"' not in text]  # (tests register passes of their own)
    assert ours and not missing, missing


def test_the_results_schema_page_names_every_field_of_its_version() -> None:
    from vitsparse.bench.schema import SCHEMA_VERSION, Row, SpeedEntry

    text = _text("results-schema.md")
    assert text.startswith(f"# `results.json` (schema {SCHEMA_VERSION})")
    for cls in (Row, SpeedEntry):
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in text]
        assert not missing, (cls.__name__, missing)


@pytest.mark.parametrize("page", REFERENCE_PAGES)
def test_every_file_a_reference_page_cites_exists(page: str) -> None:
    text = _text(page)
    missing = [path for path in _PATH.findall(text) if not (ROOT / path).exists()]
    assert not missing, f"docs/{page} cites files that do not exist: {missing}"


@pytest.mark.parametrize("page", REFERENCE_PAGES)
def test_every_test_a_reference_page_cites_exists(page: str) -> None:
    for name, function in _TEST_FILE.findall(_text(page)):
        path = ROOT / "tests" / name
        assert path.is_file(), f"docs/{page} cites tests/{name}, which does not exist"
        if function:
            tree = ast.parse(path.read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert function in defined, f"docs/{page} cites {name}::{function}, which does not exist"
