"""runtime/ must import on a CPU server that has no torch, and say which engines can run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitsparse.runtime import default_engine, engine_status

from helpers import BLOCK_TORCH

IMPORT_RUNTIME_WITHOUT_TORCH = BLOCK_TORCH + """
import vitsparse.runtime as runtime
print(runtime.default_engine())
assert "torch" not in sys.modules
"""


def test_runtime_imports_without_torch() -> None:
    command = [sys.executable, "-c", IMPORT_RUNTIME_WITHOUT_TORCH]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in {"deepsparse", "onnxruntime"}


def test_deepsparse_unavailable_on_python_3_12_says_why(monkeypatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    status = engine_status("deepsparse")
    assert not status.available and "Python < 3.12" in status.reason and "ONNX Runtime" in status.reason
    assert default_engine() == "onnxruntime"


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        engine_status("tensorrt")
