"""Rewrites inside multi-head attention: the per-head widths of q/k and of v, and per-channel scales.

qkv's output rows are laid out as [q heads | k heads | v heads], each head `head_dim` (q, k) or
`v_head_dim` (v) wide. Slicing keeps the same channels count in every head, so attention stays a
batched matmul over equal-width heads; q and k always keep the same channels (they meet in the
dot product), v may keep a different count. The attention scale is pinned to the original model's
before q/k shrink, so the scores do not change scale with the new head width.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import graph_utils as gu
from .errors import PassError
from .rewrite import as_index, set_reshape_dims, slice_linear, slice_norm
from .structure import AttentionStructure


def _reshape_sizes(node: fx.Node) -> tuple[bool, list]:
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    return packed, list(node.args[1] if packed else node.args[1:])


def _core_argument(core: fx.Node, position: int, name: str) -> fx.Node:
    return core.args[position] if len(core.args) > position else core.kwargs[name]


def query_input(gm: fx.GraphModule, attention: AttentionStructure) -> fx.Node:
    """The node feeding q into the attention core (fused: its first input; explicit: the left operand of
    the score matmul, already multiplied by the scale in timm)."""
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core):
        return _core_argument(core, 0, "query")
    return gu.walk_up(core, gu.is_matmul, 8).args[0]


def key_input(gm: fx.GraphModule, attention: AttentionStructure) -> fx.Node:
    """The node feeding k into the attention core (explicit attention: kᵀ, the score matmul's right
    operand)."""
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core):
        return _core_argument(core, 1, "key")
    return gu.walk_up(core, gu.is_matmul, 8).args[1]


def value_input(gm: fx.GraphModule, attention: AttentionStructure) -> fx.Node:
    """The node feeding v into the attention core (fused: its third input; explicit: the second
    input of the matmul after the softmax)."""
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core):
        return _core_argument(core, 2, "value")
    return gu.walk_down(core, gu.is_matmul, 8).args[1]


def _split_value_from_qkv(gm: fx.GraphModule, attention: AttentionStructure) -> fx.Node:
    """Rewrite qkv → reshape(B, N, 3, H, d) into a q/k part (B, N, 2, H, d) and a v part of its own
    (B, N, H, d_v), so v's head width can differ from q/k's. Returns the new v reshape node."""
    graph = gm.graph
    qkv = gu.module_call(gm, attention.qkv)
    reshape = gu.node_by_name(gm, attention.qkv_reshape_node)
    packed, sizes = _reshape_sizes(reshape)
    if len(sizes) != 5 or sizes[2] != 3 or reshape.args[0] is not qkv:
        raise PassError(f"{attention.qkv}: expected qkv output reshaped to (B, N, 3, heads, head_dim)")
    value = value_input(gm, attention)
    qk_width = 2 * attention.num_heads * attention.head_dim
    with graph.inserting_after(qkv):
        qk_part = graph.call_function(operator.getitem, (qkv, (Ellipsis, slice(None, qk_width))))
    with graph.inserting_after(qk_part):
        v_part = graph.call_function(operator.getitem, (qkv, (Ellipsis, slice(qk_width, None))))
    with graph.inserting_after(v_part):
        v_heads = graph.call_method("reshape", (v_part, sizes[0], sizes[1], sizes[3], attention.v_head_dim))
    with graph.inserting_after(v_heads):
        v_new = graph.call_method("permute", (v_heads, 0, 2, 1, 3))
    sizes[2] = 2
    reshape.args = (qk_part, tuple(sizes)) if packed else (qk_part, *sizes)
    for user in list(value.users):
        user.replace_input_with(value, v_new)
    return v_heads


def _value_reshape(gm: fx.GraphModule, attention: AttentionStructure) -> fx.Node:
    """v's own head reshape, splitting v out of the shared qkv reshape first when there is none."""
    v_reshape = gu.walk_up(value_input(gm, attention), gu.is_reshape, 8)
    if v_reshape is None or v_reshape.name == attention.qkv_reshape_node:
        v_reshape = _split_value_from_qkv(gm, attention)
    return v_reshape


def _head_channels(kept_per_head: torch.Tensor, heads: int, width: int, what: str) -> torch.Tensor:
    """Flat row/column positions of (heads, kept) per-head channel indices, validated."""
    kept = torch.as_tensor(kept_per_head, dtype=torch.long).cpu()
    if kept.ndim != 2 or kept.shape[0] != heads:
        raise PassError(f"{what}: expected kept channels of shape ({heads}, k), got {tuple(kept.shape)}")
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= width):
        raise PassError(f"{what}: channel indices must lie in [0, {width}) in every head, got values in "
                        f"[{int(kept.min())}, {int(kept.max())}]")
    columns = (torch.arange(heads).unsqueeze(1) * width + kept).flatten()
    as_index(columns, heads * width, what)  # validates range and duplicates
    return columns


def slice_value_heads(gm: fx.GraphModule, attention: AttentionStructure, kept_per_head: torch.Tensor) -> None:
    """Keep the same number of value channels in every head: qkv's v rows, the attention output
    reshape and proj's columns shrink together. `kept_per_head` is (heads, kept) channel indices per head.

    q and k keep their width, so the attention scale is untouched.
    """
    heads, v_dim = attention.num_heads, attention.v_head_dim
    columns = _head_channels(kept_per_head, heads, v_dim, f"{attention.proj} inputs")
    v_reshape = _value_reshape(gm, attention)
    qk_rows = torch.arange(2 * heads * attention.head_dim)
    slice_linear(gm, attention.qkv, out_keep=torch.cat([qk_rows, qk_rows.numel() + columns]))
    slice_linear(gm, attention.proj, in_keep=columns)
    kept = columns.numel() // heads
    set_reshape_dims(gm, v_reshape.name, {len(_reshape_sizes(v_reshape)[1]) - 1: kept})
    out_sizes = _reshape_sizes(gu.node_by_name(gm, attention.out_reshape_node))[1]
    set_reshape_dims(gm, attention.out_reshape_node, {len(out_sizes) - 1: columns.numel()})


def pin_attention_scale(gm: fx.GraphModule, attention: AttentionStructure) -> None:
    """Pass the model's attention scale to fused attention explicitly, so it no longer follows the head
    width (spelled-out attention multiplies by a constant already)."""
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core) and core.kwargs.get("scale") is None:
        core.kwargs = {**core.kwargs, "scale": float(attention.scale)}


def _shared_norm_channels(attention: AttentionStructure, kept: torch.Tensor) -> torch.Tensor | None:
    """The channels a q/k norm keeps: its weights are shared by every head, so every head must keep the
    same ones."""
    if attention.q_norm is None and attention.k_norm is None:
        return None
    if not bool((kept == kept[:1]).all()):
        raise PassError(f"{attention.qkv}: the q/k norm is shared by every head, so every head must keep "
                        "the same q/k channels")
    return kept[0]


def _move_qk_split(gm: fx.GraphModule, attention: AttentionStructure, qk_width: int) -> None:
    """Point the q/k part and v part slices of qkv's output (see `_split_value_from_qkv`) at a new q/k
    width."""
    for user in list(gu.module_call(gm, attention.qkv).users):
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if not (isinstance(index, tuple) and len(index) == 2 and isinstance(index[1], slice)):
            continue
        part = index[1]
        moved = slice(None, qk_width) if part.start is None else slice(qk_width, None)
        user.args = (user.args[0], (index[0], moved))


def slice_qk_heads(gm: fx.GraphModule, attention: AttentionStructure, kept_per_head: torch.Tensor) -> None:
    """Keep the same q/k channels (per head, equal count in every head): qkv's q and k rows, the q/k head
    reshape and q/k norm parameters shrink; v is split out of the shared reshape when it must keep its
    width; the attention scale stays the original's. `kept_per_head` is (heads, kept)."""
    heads, width = attention.num_heads, attention.head_dim
    kept = torch.as_tensor(kept_per_head, dtype=torch.long).cpu()
    q_rows = _head_channels(kept, heads, width, f"{attention.qkv} q/k rows")
    norm_channels = _shared_norm_channels(attention, kept)
    pin_attention_scale(gm, attention)
    _value_reshape(gm, attention)  # q/k and v widths now differ
    v_rows = torch.arange(2 * heads * width, 2 * heads * width + heads * attention.v_head_dim)
    slice_linear(gm, attention.qkv, out_keep=torch.cat([q_rows, heads * width + q_rows, v_rows]))
    _move_qk_split(gm, attention, 2 * q_rows.numel())
    reshape = gu.node_by_name(gm, attention.qkv_reshape_node)
    set_reshape_dims(gm, reshape.name, {len(_reshape_sizes(reshape)[1]) - 1: kept.shape[1]})
    for norm in {attention.q_norm, attention.k_norm} - {None}:
        slice_norm(gm, norm, norm_channels)


@torch.no_grad()
def _scale_rows(gm: fx.GraphModule, target: str, rows: torch.Tensor, factors: torch.Tensor) -> None:
    linear = gm.get_submodule(target)
    factors = factors.to(linear.weight.device, linear.weight.dtype).flatten()
    rows = rows.to(linear.weight.device)
    linear.weight[rows] *= factors.unsqueeze(1)
    if linear.bias is not None:
        linear.bias[rows] *= factors


@torch.no_grad()
def scale_query_channels(gm: fx.GraphModule, attention: AttentionStructure, factors: torch.Tensor) -> None:
    """Multiply q's channels by `factors` ((heads, head_dim), or (1, head_dim) shared by every head) inside
    the weights: q's qkv rows, or the q norm's affine parameters when a q norm follows qkv."""
    heads, width = attention.num_heads, attention.head_dim
    factors = torch.as_tensor(factors).reshape(-1, width)
    if attention.q_norm is not None:
        norm = gm.get_submodule(attention.q_norm)
        if factors.shape[0] != 1 and not bool((factors == factors[:1]).all()):
            raise PassError(f"{attention.q_norm}: a q norm shared by every head takes one scale per channel")
        if getattr(norm, "weight", None) is None:
            raise PassError(f"{attention.q_norm}: a q norm without affine weights cannot absorb a scale")
        for param in (norm.weight, getattr(norm, "bias", None)):
            if param is not None:
                param.mul_(factors[0].to(param.device, param.dtype))
        return
    _scale_rows(gm, attention.qkv, torch.arange(heads * width), factors.expand(heads, width))


def scale_value_channels(gm: fx.GraphModule, attention: AttentionStructure, factors: torch.Tensor) -> None:
    """Multiply v's channels by `factors` (heads, v_head_dim) inside qkv's v rows."""
    heads, width = attention.num_heads, attention.v_head_dim
    start = 2 * heads * attention.head_dim
    factors = torch.as_tensor(factors).reshape(heads, width)
    _scale_rows(gm, attention.qkv, torch.arange(start, start + heads * width), factors)
