"""Which CPU inference engines this Python can run, and why not when one cannot.

The default engine is the deployable one: OpenVINO with vitsparse's sparse kernels where `make install`
built them (it runs every file plain OpenVINO runs, and the sparse-kernel nodes besides), plain OpenVINO
where they are not built, ONNX Runtime where OpenVINO is missing. DeepSparse 1.8.0 (the last real
release: end of life, licensed for evaluation, Python < 3.12 with numpy < 2 and onnx < 1.15 only) runs
when it is named.
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
                                                 f"Python {version}")
    if importlib.util.find_spec("deepsparse") is None:
        return EngineStatus("deepsparse", False, "DeepSparse is not installed (pip install "
                                                 "'deepsparse==1.8.0')")
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


DEFAULT_ORDER = ("openvino-sparse", "openvino", "onnxruntime")  # the first available is the default


def default_engine() -> str:
    """The engine the commands run when none is named: the first of DEFAULT_ORDER available here
    (ONNX Runtime when none is, so that its own error says why)."""
    return next((name for name in DEFAULT_ORDER if engine_status(name).available), DEFAULT_ORDER[-1])
