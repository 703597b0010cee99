"""A CPU server installs only requirements-runtime.txt and `pip install --no-deps .`: no torch.

The commands such a server runs (serve, bench, eval) must start without torch, through both entry
points, and every third-party module runtime/ imports must be in requirements-runtime.txt.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import write_artifact

from helpers import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-runtime.txt"
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "multipart": "python-multipart",
                 "sklearn": "scikit-learn"}

RUNTIME_MAIN = BLOCK_TORCH + """
import runpy
sys.argv = ["python -m vitsparse.runtime", *sys.argv[1:]]
try:
    runpy.run_module("vitsparse.runtime", run_name="__main__")
finally:
    assert "torch" not in sys.modules
"""
VITSPARSE_MAIN = BLOCK_TORCH + """
from vitsparse.bench.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def run_without_torch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", [RUNTIME_MAIN, VITSPARSE_MAIN],
                         ids=["python -m vitsparse.runtime", "vitsparse"])
@pytest.mark.parametrize("command", ["serve", "bench", "eval"])
def test_the_runtime_commands_start_without_torch(script, command) -> None:
    done = run_without_torch(script, command, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_vitsparse_eval_runs_without_torch_and_says_what_it_leaves_out(tmp_path) -> None:
    artifact = write_artifact(tmp_path / "tiny")
    for label in ("zero", "one"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "images" / label / "a.png")
    done = run_without_torch(VITSPARSE_MAIN, "eval", str(artifact), "--data", str(tmp_path / "images"),
                             "-e", "onnxruntime")
    assert done.returncode == 0, done.stderr
    assert "over 2 images" in done.stdout and "PyTorch agreement is left out" in done.stderr


def _requirement_names() -> set[str]:
    names = set()
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.match(r"[A-Za-z0-9._-]+", line).group(0).lower().replace("_", "-"))
    return names


def _third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level module -> the first file importing it, for every import that is not stdlib or vitsparse."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top not in sys.stdlib_module_names and top != "vitsparse":
                    found.setdefault(top, path.name)
    return found


def test_every_module_the_runtime_imports_is_in_requirements_runtime() -> None:
    imports = _third_party_imports(ROOT / "runtime")
    assert {"numpy", "onnx", "onnxruntime", "starlette", "uvicorn", "PIL"} <= imports.keys()
    listed = _requirement_names()
    missing = {module: where for module, where in imports.items()
               if DISTRIBUTIONS.get(module, module).lower() not in listed}
    assert not missing, f"imported by runtime/ but not in requirements-runtime.txt: {missing}"
    assert "torch" not in listed


def test_requirements_runtime_pins_what_pyproject_pins() -> None:
    """The runtime's requirement lines are copies of pyproject.toml's: each must match one exactly."""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.sub(r"\s+", "", d).replace('"', "'") for d in dependencies}
    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    drifted = [line for line in lines if line and re.sub(r"\s+", "", line).replace('"', "'") not in pinned]
    assert not drifted, f"requirements-runtime.txt lines that differ from pyproject.toml: {drifted}"
