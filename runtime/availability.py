"""Which CPU inference engines this Python can run, and why not when one cannot.

DeepSparse 1.8.0 (the last real release) installs only on Python < 3.12 with numpy < 2 and
onnx < 1.15; elsewhere (a GPU training machine on Python 3.12, say) vitsparse still installs
and falls back to ONNX Runtime, saying so. OpenVINO is a dense baseline and an engine for users who
must not run DeepSparse; it is never the default.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata

from .errors import UnknownEngineError

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # before anything can import deepsparse

ENGINES = ("deepsparse", "onnxruntime", "openvino", "openvino-sparse")
PACKAGES = ("deepsparse", "onnxruntime", "openvino")  # what the engines come from


@dataclass(frozen=True)
class EngineStatus:
    name: str
    available: bool
    reason: str


def _deepsparse_status() -> EngineStatus:
    if sys.version_info >= (3, 12):
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return EngineStatus("deepsparse", False, f"DeepSparse 1.8.0 needs Python < 3.12 and this is "
                                                 f"Python {version}; ONNX Runtime is used instead")
    if importlib.util.find_spec("deepsparse") is None:
        return EngineStatus("deepsparse", False, "DeepSparse is not installed (pip install "
                                                 "'deepsparse==1.8.0'); ONNX Runtime is used instead")
    return EngineStatus("deepsparse", True, "installed")


def _onnxruntime_status() -> EngineStatus:
    if importlib.util.find_spec("onnxruntime") is None:
        return EngineStatus("onnxruntime", False, "ONNX Runtime is not installed (pip install onnxruntime)")
    return EngineStatus("onnxruntime", True, "installed")


def _openvino_status() -> EngineStatus:
    if importlib.util.find_spec("openvino") is None:
        return EngineStatus("openvino", False, "OpenVINO is not installed (pip install openvino)")
    return EngineStatus("openvino", True, "installed")


def _openvino_sparse_status() -> EngineStatus:
    from .sparse_extension import unavailable_reason

    openvino = _openvino_status()
    reason = openvino.reason if not openvino.available else unavailable_reason()
    return EngineStatus("openvino-sparse", reason is None, reason or "built")


_STATUS = {"deepsparse": _deepsparse_status, "onnxruntime": _onnxruntime_status, "openvino": _openvino_status,
           "openvino-sparse": _openvino_sparse_status}


def engine_status(name: str) -> EngineStatus:
    """Whether engine `name` can run here, with the reason when it cannot."""
    try:
        return _STATUS[name]()
    except KeyError:
        raise UnknownEngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}") from None


def engine_versions() -> dict[str, str]:
    """The installed version of each engine's package (those not installed left out)."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def default_engine() -> str:
    """The sparse engine when it is available, ONNX Runtime otherwise."""
    return "deepsparse" if engine_status("deepsparse").available else "onnxruntime"
