"""docs/cli.md against the real argparse parsers.

docs/cli.md has one section per sub-command, headed `## vitsparse COMMAND`, holding at most one table
`| flag | default | what it does |` (a command without arguments has none). Per row:

- flag: every spelling of one option as code spans (`` `-b`, `--batch_size` ``), or a positional
  argument's name as `--help` shows it (its metavar, else its dest);
- default: `required` for a positional or required option, else the parser's default written by
  `written_default` (the rule the page states in its first lines), optionally in backticks;
- what it does: not empty.

Every option of each sub-parser except -h/--help must have exactly one row with exactly its spellings
and default, and no row may name a flag the parser lacks. `python -m vitsparse.runtime`'s serve, bench
and eval must take the same arguments as `vitsparse`'s, so the page covers them too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from doc_examples import ROOT

PAGE = ROOT / "docs" / "cli.md"
HEADER = ["flag", "default", "what it does"]
_SECTION = re.compile(r"^## vitsparse ([a-z][a-z-]*)[ \t]*$", re.M)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of a parser built with add_subparsers, by name."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def spellings(action: argparse.Action) -> tuple[str, ...]:
    """How the flag column names an argument: its option strings, or a positional's usage name."""
    if action.option_strings:
        return tuple(action.option_strings)
    return (action.metavar if isinstance(action.metavar, str) else action.dest,)


def written_default(action: argparse.Action) -> str:
    """The default as docs/cli.md writes it: `required`; True/False -> on/off; None or an empty list ->
    none; a list or tuple -> its items joined by commas; anything else -> str()."""
    value = action.default
    if action.required:
        return "required"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(inner)]


def parse_tables(text: str) -> dict[str, list[tuple[int, list[str]]]]:
    """Each `## vitsparse COMMAND` section's table rows as (line number, [flag, default, what]).

    Raises ValueError for a section named twice, a second table in one section, or a malformed table."""
    sections: dict[str, list[tuple[int, list[str]]]] = {}
    heads = list(_SECTION.finditer(text))
    for index, head in enumerate(heads):
        name = head.group(1)
        if name in sections:
            raise ValueError(f"docs/cli.md has two sections '## vitsparse {name}'")
        end = heads[index + 1].start() if index + 1 < len(heads) else len(text)
        next_h2 = re.search(r"^## ", text[head.end():end], re.M)  # a later non-command section ends it too
        body_end = head.end() + next_h2.start() if next_h2 else end
        first_line = text.count("\n", 0, head.end()) + 1
        rows: list[tuple[int, list[str]]] = []
        tables = 0
        previous_was_table = False
        for offset, line in enumerate(text[head.end():body_end].split("\n")):
            is_table = line.lstrip().startswith("|")
            if is_table and not previous_was_table:
                tables += 1
                if tables > 1:
                    raise ValueError(f"vitsparse {name}: more than one table in its section")
                if _cells(line) != HEADER:
                    raise ValueError(f"vitsparse {name}: the table's header must be | flag | default | "
                                     f"what it does |, got {line.strip()!r}")
            elif is_table and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
                cells = _cells(line)
                if len(cells) != 3:
                    raise ValueError(f"vitsparse {name}: row {line.strip()!r} has {len(cells)} cells, not 3")
                rows.append((first_line + offset, cells))
            previous_was_table = is_table
        sections[name] = rows
    return sections


def check_page(text: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Everything in which the page's tables and the parsers differ, one line each (empty: they agree)."""
    try:
        tables = parse_tables(text)
    except ValueError as err:
        return [str(err)]
    problems = [f"vitsparse {name}: no '## vitsparse {name}' section" for name in parsers
                if name not in tables]
    problems += [f"'## vitsparse {name}': there is no such command" for name in tables
                 if name not in parsers]
    for name, parser in parsers.items():
        rows = tables.get(name)
        if rows is None:
            continue
        by_spelling = {spelling: action for action in documented_actions(parser)
                       for spelling in spellings(action)}
        seen: set[int] = set()
        for line, (flag_cell, default_cell, what) in rows:
            where = f"vitsparse {name} (docs/cli.md:{line})"
            names = re.findall(r"`([^`]+)`", flag_cell)
            if not names:
                problems.append(f"{where}: the flag cell {flag_cell!r} names no flag in backticks")
                continue
            unknown = [n for n in names if n not in by_spelling]
            if unknown:
                problems.append(f"{where}: {', '.join(unknown)}: the parser has no such argument")
                continue
            actions = {id(by_spelling[n]): by_spelling[n] for n in names}
            if len(actions) > 1:
                problems.append(f"{where}: one row names several arguments: {', '.join(names)}")
                continue
            (action,) = actions.values()
            label = "/".join(spellings(action))
            if sorted(names) != sorted(spellings(action)):
                problems.append(f"{where}: {label}: the row names {', '.join(names)}, the parser "
                                f"{', '.join(spellings(action))}")
            if id(action) in seen:
                problems.append(f"{where}: {label} has a second row")
            seen.add(id(action))
            documented = default_cell.strip()
            if re.fullmatch(r"`[^`]*`", documented):
                documented = documented[1:-1]
            if documented != written_default(action):
                problems.append(f"{where}: {label}: documented default {documented!r}, the parser's is "
                                f"{written_default(action)!r} ({action.default!r})")
            if not what:
                problems.append(f"{where}: {label}: the 'what it does' cell is empty")
        for action in documented_actions(parser):
            if id(action) not in seen:
                problems.append(f"vitsparse {name}: {'/'.join(spellings(action))} (default "
                                f"{written_default(action)!r}) is not in the section's table")
    return problems


def vitsparse_parsers() -> dict[str, argparse.ArgumentParser]:
    from vitsparse.bench.cli import build_parser

    return subparsers(build_parser())


def test_every_flag_and_default_is_documented() -> None:
    problems = check_page(PAGE.read_text(encoding="utf-8"), vitsparse_parsers())
    assert not problems, "docs/cli.md differs from the parsers:\n" + "\n".join(problems)


def _signature(parser: argparse.ArgumentParser) -> list[tuple]:
    return [(spellings(a), a.dest, written_default(a), a.nargs, a.choices, type(a).__name__)
            for a in documented_actions(parser)]


def test_the_runtime_entry_takes_the_documented_arguments() -> None:
    """`python -m vitsparse.runtime` gets no section of its own: its commands must be vitsparse's."""
    from vitsparse.runtime.__main__ import build_parser

    full = vitsparse_parsers()
    runtime = subparsers(build_parser())
    assert set(runtime) <= set(full), f"runtime commands with no vitsparse twin: {set(runtime) - set(full)}"
    for name, parser in runtime.items():
        assert _signature(parser) == _signature(full[name]), (
            f"`python -m vitsparse.runtime {name}` and `vitsparse {name}` take different arguments; "
            "docs/cli.md says they are the same")
    assert "python -m vitsparse.runtime" in PAGE.read_text(encoding="utf-8")


# the checker itself: each doctoring of the real page must be reported, so the tests above cannot pass
# vacuously (a page the parser misreads as empty would fail here)


def _doctor(old: str, new: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"docs/cli.md should hold {old!r} once: update the doctoring"
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("| `--port` | 8000 |", "| `--port` | 8080 |",
         r"vitsparse serve \(docs/cli.md:\d+\): --port: documented default '8080', the parser's is '8000'"),
        ("| `-b`, `--batch_size` | 1 |", "| `-b`, `--batch-size` | 1 |",
         r"vitsparse bench .*--batch-size: the parser has no such argument"),
        ("| `-b`, `--batch_size` | 1 |", "| `--batch_size` | 1 |",
         r"vitsparse bench .*-b/--batch_size: the row names --batch_size, the parser -b, --batch_size"),
        ("| `--json` | off |", "| `--json` | on |",
         r"vitsparse info .*--json: documented default 'on', the parser's is 'off'"),
        ("| `--batch-sizes` | 1,2,3,4,5,6,7,8 |", "| `--batch-sizes` | `1-8` |",
         r"vitsparse load-test .*--batch-sizes: documented default '1-8', the parser's is '1,2,3,4,5,6,7,8'"),
        ("| `--overwrite` | off | delete the run in the output folder and start over |\n", "",
         r"vitsparse prune: --overwrite \(default 'off'\) is not in the section's table"),
        ("## vitsparse verify\n", "## vitsparse verified\n",
         r"vitsparse verify: no '## vitsparse verify' section"),
    ],
    ids=["wrong-default", "unknown-flag", "missing-spelling", "switch", "list", "missing-row", "section"],
)
def test_the_checker_reports_a_doctored_page(old: str, new: str, reported: str) -> None:
    problems = check_page(_doctor(old, new), vitsparse_parsers())
    assert any(re.search(reported, p) for p in problems), f"not reported: {reported!r}; got {problems}"


def test_the_checker_sees_every_command_and_row() -> None:
    tables = parse_tables(PAGE.read_text(encoding="utf-8"))
    parsers = vitsparse_parsers()
    assert set(tables) == set(parsers)
    rows = sum(len(r) for r in tables.values())
    assert rows == sum(len(documented_actions(p)) for p in parsers.values()) > 50


def test_written_default_rule() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--sizes", default=(1, 16))
    parser.add_argument("--empty", action="append", default=[])
    parser.add_argument("--out", default=Path("bench/results"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--need", required=True)
    written = {a.dest: written_default(a) for a in documented_actions(parser)}
    assert written == {"path": "required", "flag": "off", "sizes": "1,16", "empty": "none",
                       "out": "bench/results", "seconds": "10.0", "need": "required"}
