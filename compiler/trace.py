"""Trace a timm ViT to a torch.fx GraphModule that keeps module and parameter names."""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceFailure

INPUT_SHAPE_KEY = "vitsparse_input_shape"
SERVING_KEY = "vitsparse_serving"  # how an image becomes the input, and the class names (for servers)
META_PREFIX = "vitsparse_"  # every graph-level fact vitsparse keeps in GraphModule.meta
PREPROCESSING_FIELDS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")

# Modules kept as single call_module nodes even when a library subclasses them (timm's LayerNorm
# subclasses nn.LayerNorm and would otherwise be traced into F.layer_norm, losing its name).
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Dropout,
    nn.Identity,
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ViTTracer(fx.Tracer):
    """fx tracer that keeps the layers passes rewrite (linears, norms, convs) as named leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _concrete_defaults(model: nn.Module) -> dict[str, object]:
    """Pin every forward argument after the image to its default (timm's attn_mask=None, ...)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }


def _drop_pinned_placeholders(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for pinned arguments, and the asserts that guard them.

    After pinning `attn_mask=None` the graph still takes that argument and asserts its value;
    dropping both leaves a graph of one input, the image, which is what export and engines want.
    """
    image, *pinned = [n for n in graph.nodes if n.op == "placeholder"]
    for placeholder in pinned:
        guards = list(_descendants_in_order(placeholder))
        if all(_is_guard(n) for n in guards):
            for node in reversed(guards):
                graph.erase_node(node)
            graph.erase_node(placeholder)


def _is_guard(node: fx.Node) -> bool:
    """An assert fx inserted (torch._assert, fx's _assert_is_none) or the comparison feeding one."""
    if node.op != "call_function":
        return False
    return node.target in (operator.eq, operator.is_, operator.is_not) or getattr(
        node.target, "__name__", ""
    ).startswith("_assert")


def _descendants_in_order(node: fx.Node) -> list[fx.Node]:
    found, frontier = {}, [node]
    while frontier:
        for user in frontier.pop().users:
            if user not in found:
                found[user] = None
                frontier.append(user)
    return [n for n in node.graph.nodes if n in found]


def infer_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) a timm ViT was built for, read from its patch embedding."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is None or not isinstance(proj, nn.Conv2d):
        raise TraceFailure(
            f"cannot tell the input size of {type(model).__name__}: expected a timm-style "
            "`patch_embed` with `img_size` and a Conv2d `proj`; pass input_shape=(C, H, W)"
        )
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return (proj.in_channels, int(height), int(width))


def input_shape_of(gm: fx.GraphModule) -> tuple[int, int, int]:
    """The (C, H, W) input shape recorded on a traced graph."""
    try:
        return tuple(gm.meta[INPUT_SHAPE_KEY])
    except KeyError:
        raise TraceFailure("graph carries no input shape: build it with vitsparse.compiler.trace()") from None


def trace(model: nn.Module, input_shape: Sequence[int] | None = None, *, copy_weights: bool = True
          ) -> fx.GraphModule:
    """Symbolically trace `model` (in eval mode) to a GraphModule with the model's own names.

    Submodules keep their qualified names (`blocks.0.attn.qkv`) and loose parameters stay
    `get_attr` nodes (`cls_token`, `blocks.0.ls1.gamma`), so a state dict of the graph has the
    same keys as the model's. The graph owns a copy of the weights unless `copy_weights=False`,
    so pruning and fine-tuning it never changes `model` (often the distillation teacher).
    """
    if not isinstance(model, nn.Module):
        raise TraceFailure(f"expected a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else infer_input_shape(model)
    if len(shape) != 3:
        raise TraceFailure(f"input_shape must be (C, H, W), got {shape}")
    was_training = model.training
    if copy_weights:
        model = copy.deepcopy(model)
    model.eval()
    try:
        tracer = ViTTracer()
        graph = tracer.trace(model, concrete_args=_concrete_defaults(model))
    except Exception as err:  # fx raises many types; the user needs one clear message
        raise TraceFailure(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
    finally:
        if not copy_weights:
            model.train(was_training)
    _drop_pinned_placeholders(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Graph")
    gm.meta[INPUT_SHAPE_KEY] = shape
    gm.meta[SERVING_KEY] = serving_info(model, shape)
    gm.eval()
    return gm


def serving_info(model: nn.Module, input_shape: Sequence[int]) -> dict[str, object]:
    """The model's eval preprocessing (timm `pretrained_cfg` fields) and class names, as plain JSON values.

    A server needs both to classify an image file exactly as the model was evaluated; fields the
    model's cfg does not carry are left out, and labels are None unless one name per class is known.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    preprocessing: dict[str, object] = {"input_size": [int(d) for d in input_shape]}
    for field in PREPROCESSING_FIELDS:
        if cfg.get(field) is not None:
            value = cfg[field]
            preprocessing[field] = [float(v) for v in value] if isinstance(value, (tuple, list)) else value
    labels = cfg.get("label_names")
    num_classes = getattr(model, "num_classes", None)
    if labels is not None and len(labels) != num_classes:
        labels = None
    return {"preprocessing": preprocessing, "labels": None if labels is None else [str(x) for x in labels]}


def carry_meta(source: fx.GraphModule, target: fx.GraphModule) -> None:
    """Give `target` every vitsparse fact `source` holds in `meta` that it lacks (input shape, serving)."""
    for key, value in source.meta.items():
        if key.startswith(META_PREFIX):
            target.meta.setdefault(key, copy.deepcopy(value))


def example_input(gm: fx.GraphModule, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded random image batch of the graph's input shape, on the graph's device."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn((batch_size, *input_shape_of(gm)), generator=generator)
    first = next(gm.parameters(), None)
    return tensor.to(first.device) if first is not None else tensor
