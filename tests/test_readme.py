"""README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vitsparse.compiler.export import ARTIFACT_FILES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has a Python API example"
    assert len(blocks[0].strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)  # the example writes its artifact folder here
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "block 5: 4 heads x 16" in out
    top1, directory = out.strip().splitlines()[-1].split()
    assert float(top1) >= 0.9
    assert sorted(p.name for p in (tmp_path / directory).iterdir()) == sorted(ARTIFACT_FILES)

    from vitsparse.compiler import Recipe, load_weights, replay  # the sentence after the example
    from vitsparse.models import build_model

    rebuilt = load_weights(replay(build_model("digits-vit"), Recipe.load("digits-75/recipe.json")),
                           "digits-75/weights.safetensors")
    sample = next(iter(namespace["data"].test))[0]
    assert torch.equal(rebuilt(sample), namespace["pruned"](sample))
