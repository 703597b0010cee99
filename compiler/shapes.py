"""Shape propagation: run the graph once on a seeded example and keep every node's tensor shape."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .trace import example_input


def propagate_shapes(gm: fx.GraphModule, batch_size: int = 1) -> fx.GraphModule:
    """Annotate each node with `meta['tensor_meta']` for a batch of `batch_size` images."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input(gm, batch_size))
    return gm


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated tensor shape of a node, or None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
