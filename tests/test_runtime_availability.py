"""runtime/ must import on a CPU server that has no torch, and say which engines can run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitsparse.runtime import availability, default_engine, engine_status

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
    assert done.stdout.strip() == default_engine()


def test_deepsparse_unavailable_on_python_3_12_says_why(monkeypatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    status = engine_status("deepsparse")
    assert not status.available and "Python < 3.12" in status.reason and "3.12" in status.reason


def _unavailable(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(availability._STATUS, name, lambda name=name: availability.EngineStatus(
            name, False, "switched off by the test"))


def test_the_default_engine_is_the_first_deployable_one_available(monkeypatch) -> None:
    """openvino-sparse where its kernels are built, else openvino, else onnxruntime; DeepSparse (end of
    life, evaluation licence) never, even where it is installed."""
    monkeypatch.setitem(availability._STATUS, "deepsparse",
                        lambda: availability.EngineStatus("deepsparse", True, "installed"))
    for name in ("openvino-sparse", "openvino", "onnxruntime"):
        monkeypatch.setitem(availability._STATUS, name,
                            lambda name=name: availability.EngineStatus(name, True, "installed"))
    assert default_engine() == "openvino-sparse"
    _unavailable(monkeypatch, "openvino-sparse")
    assert default_engine() == "openvino"
    _unavailable(monkeypatch, "openvino")
    assert default_engine() == "onnxruntime"
    _unavailable(monkeypatch, "onnxruntime")
    assert default_engine() == "onnxruntime"  # so that creating it says why it cannot run


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        engine_status("tensorrt")
