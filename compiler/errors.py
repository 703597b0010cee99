"""Errors the compiler raises for user mistakes, each naming what was found and what was expected."""


class CompilerError(ValueError):
    """Base class: a model, graph or recipe the compiler cannot work with."""


class TraceFailure(CompilerError):
    """The model could not be traced to a torch.fx graph."""


class NotAViTError(CompilerError):
    """The traced graph does not have the shape of a Vision Transformer."""


class RecipeError(CompilerError):
    """A recipe file is corrupt, from another schema version, or names an unknown pass."""


class PassError(CompilerError):
    """A pass was given settings or a graph it cannot apply to."""
