"""The code blocks of README.md and docs/, found by the name on the marker line above each block.

A runnable block is written as

    <!-- example: quick-start -->
    ```bash
    ...
    ```

and a test asks for it by that name (`example("quick-start")`), never by its position, so pages can be
reordered freely. docs/results/ is excluded: its pages record the commands of past runs, which take hours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ("python", "bash", "yaml")  # the languages every block of which must carry a marker
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!-- example: ([a-z0-9][a-z0-9-]*) -->\s*$")


@dataclass(frozen=True)
class Example:
    name: str | None
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documents() -> list[Path]:
    """README.md and every page under docs/ except the records of past runs."""
    docs = ROOT / "docs"
    pages = sorted(p for p in docs.rglob("*.md") if "results" not in p.relative_to(docs).parts)
    return [ROOT / "README.md", *pages]


def blocks(path: Path) -> list[Example]:
    """Every fenced block of one page, named when the line above it is a marker."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(above)
        found.append(Example(marker.group(1) if marker else None, path, line, match.group(1), match.group(2)))
    return found


def all_blocks() -> list[Example]:
    return [block for path in documents() for block in blocks(path)]


def examples() -> dict[str, Example]:
    """Named blocks by name; a name used twice is an error."""
    named: dict[str, Example] = {}
    for block in all_blocks():
        if block.name is None:
            continue
        if block.name in named:
            first = named[block.name].where()
            raise ValueError(f"example name {block.name!r} is used at {first} and {block.where()}")
        named[block.name] = block
    return named


def example(name: str) -> Example:
    found = examples()
    if name not in found:
        raise KeyError(f"no block marked '<!-- example: {name} -->' in README.md or docs/")
    return found[name]


def run_python(name: str, namespace: dict | None = None) -> dict:
    """Executes a named Python example in `namespace` (a fresh one by default) and returns it."""
    block = example(name)
    assert block.language == "python", f"{block.where()} is a {block.language} block"
    namespace = {} if namespace is None else namespace
    exec(compile(block.code, block.where(), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def split_commands(code: str) -> list[list[str]]:
    """Shell code as its commands split into words: comments dropped, continued and quoted lines joined."""
    import shlex

    found, pending = [], ""
    for line in code.replace("\\\n", " ").splitlines():
        pending += line + "\n"
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            found.append(words)
        pending = ""
    if pending.strip():
        raise ValueError(f"unterminated shell command: {pending!r}")
    return found


def commands(name: str) -> list[list[str]]:
    """A named shell example's commands, split into words."""
    return split_commands(example(name).code)
