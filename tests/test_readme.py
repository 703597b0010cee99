"""README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has a Python API example"
    assert len(blocks[0].strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)  # the example writes recipe.json and weights.safetensors
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "recipe.json").is_file() and (tmp_path / "weights.safetensors").is_file()
    out = capsys.readouterr().out
    assert "block 11: 6 heads x 64" in out and "4598882304" in out
    assert float(out.strip().splitlines()[-1]) >= 0.95
