"""Where vitsparse's OpenVINO extension (the sparse kernels, built by `make install`) lives, and loading it.

kernels/build.sh puts the library in the Python environment it was built for, so one checkout serves
several interpreters (`.venv`, `.venv-3.13`) each with its own OpenVINO; when the build was not
possible it leaves the reason there instead. VITSPARSE_KERNELS_DIR points to another folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx

from .errors import EngineLoadError, EngineUnavailableError

LIBRARY = "libvitsparse_openvino.so"
ENGINE = "openvino-sparse"  # the engine that loads the extension
DOMAIN = "com.vitsparse"  # the ONNX domain of the extension's nodes (SparseLinear, SparseMLP)
ENV_DIR = "VITSPARSE_KERNELS_DIR"
ENV_ISA = "VITSPARSE_KERNEL_ISA"  # scalar | avx2 | avxvnni | avx512: the kernels never use more than this
ISAS = ("scalar", "avx2", "avxvnni", "avx512")


def extension_path() -> Path:
    """The library OpenVINO should load (it may not exist)."""
    folder = os.environ.get(ENV_DIR) or Path(sys.prefix) / "lib" / "vitsparse"
    return Path(folder) / LIBRARY


def unavailable_reason() -> str | None:
    """Why the extension cannot be loaded here, or None when its library is in place."""
    path = extension_path()
    if path.is_file():
        return None
    note = path.with_name("unavailable.txt")
    if note.is_file():
        return f"vitsparse's sparse kernels were not built: {note.read_text(encoding='utf-8').strip()}"
    return (f"vitsparse's sparse kernels are not built for this Python ({path} is missing); "
            f"run `make install` (it needs cmake and a C++ compiler) or kernels/build.sh")


def check_sparse_nodes(engine: str, model: onnx.ModelProto, path: object) -> None:
    """EngineLoadError when `model` holds vitsparse's nodes (SparseLinear, SparseMLP) and `engine`
    cannot run them."""
    if engine != ENGINE and any(node.domain == DOMAIN for node in model.graph.node):
        raise EngineLoadError(f"{path} holds vitsparse's sparse-kernel nodes (exported with sparse kernels), "
                              f"which only the {ENGINE!r} engine runs")


def add_extension(core) -> None:
    """Load the extension into an openvino.Core, or EngineUnavailableError saying why it cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        raise EngineUnavailableError(reason)
    isa = os.environ.get(ENV_ISA)
    if isa and isa not in ISAS:
        raise EngineUnavailableError(f"{ENV_ISA} must be one of {', '.join(ISAS)}, not {isa!r}")
    try:
        core.add_extension(str(extension_path()))
    except Exception as exc:  # OpenVINO raises RuntimeError; a library built for another OpenVINO fails here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineUnavailableError(f"OpenVINO could not load {extension_path()}: {first} "
                                     f"(rebuild it with `make install`)") from exc
