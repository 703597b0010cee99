"""Magnitude pruning, the baseline: the sparsity pass with its saliency fixed to |w|.

Kept as its own pass name so `MagnitudePass(sparsity=0.9)` reads plainly and recipes written with
it replay; it takes every setting of `SparsityConfig` except the saliency.
"""

from __future__ import annotations

from vitsparse.compiler import register_pass

from .sparsity_pass import SparsityConfig, SparsityPass


@register_pass
class MagnitudePass(SparsityPass):
    """Mask the smallest-magnitude weights of the attention and MLP linears (configurable targets)."""

    name = "magnitude"

    @classmethod
    def make_config(cls, **settings) -> SparsityConfig:
        saliency = settings.pop("saliency", "magnitude")
        if saliency != "magnitude":
            raise ValueError(f"MagnitudePass always uses saliency 'magnitude'; for {saliency!r} "
                             f"use SparsityPass")
        return SparsityConfig(saliency="magnitude", **settings)
