"""matplotlib without a display, and figures saved the same way by every plot of the report."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, layout: bool = True) -> None:
    """Lay out (unless the caller placed things itself), write as PNG and close."""
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    pyplot().close(fig)
