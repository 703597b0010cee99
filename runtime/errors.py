"""Errors the runtime raises for user mistakes, each naming what was given and what was expected.

They subclass ValueError (or FileNotFoundError) so a command line can print them in one line.
"""


class RuntimeInputError(ValueError):
    """Base class: a model file, engine choice or input the runtime cannot work with."""


class ModelNotFoundError(FileNotFoundError):
    """The ONNX file does not exist."""


class InvalidModelError(RuntimeInputError):
    """The file exists but is not a usable ONNX model (corrupt, not ONNX, or fails the checker)."""


class UnknownEngineError(RuntimeInputError):
    """An engine name that is not registered."""


class EngineUnavailableError(RuntimeInputError):
    """A known engine that cannot run on this machine (not installed, wrong Python)."""


class UnsupportedPrecisionError(RuntimeInputError):
    """A precision hint the engine does not offer, or one this CPU has no instructions for."""


class EngineLoadError(RuntimeInputError):
    """The engine rejected a model that passed the ONNX checker."""


class BatchSizeError(RuntimeInputError):
    """The model cannot run at the requested batch size (e.g. the batch is baked into Reshape constants)."""


class InputMismatchError(RuntimeInputError):
    """Inputs whose number, shape or dtype differ from what the engine was compiled for."""


def first_line(exc: BaseException, limit: int = 500) -> str:
    """The first line of an exception's message (native engines add pages of context), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
