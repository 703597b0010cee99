"""Find a Vision Transformer's structure in a traced graph by matching node patterns.

Nothing here looks at module names: a block is recognised as
norm → Linear(qkv) → reshape/permute/unbind → (q/k norm) → attention core → Linear(proj)
→ (layer scale) → residual add, then norm → Linear(fc1) → act → Linear(fc2) → (layer scale)
→ residual add, with the attention core either fused (scaled_dot_product_attention) or
spelled out (matmul → softmax → matmul).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from . import graph_utils as gu
from .errors import NotAViTError
from .shapes import propagate_shapes, shape_of
from .trace import input_shape_of


@dataclass(frozen=True)
class CoupledParam:
    """One tensor of a coupling group: parameter `name`, sliced along `dim`."""

    name: str
    dim: int


@dataclass(frozen=True)
class AttentionStructure:
    """Multi-head self-attention of one block. Modules by qualified name, other nodes by node name."""

    qkv: str
    proj: str
    q_norm: str | None
    k_norm: str | None
    num_heads: int
    head_dim: int  # of q and k
    v_head_dim: int  # of v (and the attention output per head); smaller than head_dim once sliced
    scale: float
    fused: bool
    core_node: str
    qkv_reshape_node: str
    out_reshape_node: str

    @property
    def attn_dim(self) -> int:
        """Width of the attention output that `proj` reads."""
        return self.num_heads * self.v_head_dim


@dataclass(frozen=True)
class MlpStructure:
    """The block's MLP: fc1 → activation → (norm) → fc2."""

    fc1: str
    act_node: str
    fc2: str
    norm: str | None
    hidden_dim: int


@dataclass(frozen=True)
class BlockStructure:
    """One pre-norm transformer block and the residual-stream nodes around it."""

    index: int
    norm1: str
    attn: AttentionStructure
    layer_scale1: str | None
    norm2: str
    mlp: MlpStructure
    layer_scale2: str | None
    input_node: str
    attn_residual_node: str
    output_node: str


@dataclass(frozen=True)
class ViTStructure:
    """What passes need to know about a traced ViT; re-derived after every rewrite."""

    input_shape: tuple[int, int, int]
    embed_dim: int
    num_patches: int
    num_prefix_tokens: int
    pool: str
    patch_embed: str
    prefix_params: tuple[str, ...]
    pos_embed: str | None
    blocks: tuple[BlockStructure, ...]
    final_norm: str | None
    heads: tuple[str, ...]
    residual_coupled: tuple[CoupledParam, ...] = field(repr=False)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def describe(self) -> str:
        """A short human-readable summary, one line per block."""
        lines = [
            f"input {self.input_shape}, embed_dim {self.embed_dim}, {self.num_patches} patches + "
            f"{self.num_prefix_tokens} prefix tokens {list(self.prefix_params)}, pool={self.pool}, "
            f"pos_embed={self.pos_embed}, heads={list(self.heads)}",
            f"residual stream couples {len(self.residual_coupled)} tensors",
        ]
        for b in self.blocks:
            a, m = b.attn, b.mlp
            extras = [n for n in (a.q_norm and "qk-norm", b.layer_scale1 and "layer-scale") if n]
            kind = "fused" if a.fused else "explicit"
            width = f"{a.head_dim}" if a.v_head_dim == a.head_dim else f"{a.head_dim} (v {a.v_head_dim})"
            lines.append(
                f"block {b.index}: {a.num_heads} heads x {width} ({kind}, scale {a.scale:.4g}), "
                f"mlp hidden {m.hidden_dim}" + (f", {', '.join(extras)}" if extras else "")
            )
        return "\n".join(lines)


def _linear(gm: fx.GraphModule, target: str) -> nn.Linear:
    return gm.get_submodule(target)


def _module_coupled(gm: fx.GraphModule, target: str, dim: int) -> list[CoupledParam]:
    """Weight (and bias, when it runs along `dim`) of a module, as coupled tensors."""
    module = gm.get_submodule(target)
    coupled = []
    if getattr(module, "weight", None) is not None:
        coupled.append(CoupledParam(f"{target}.weight", dim))
    if dim == 0 and getattr(module, "bias", None) is not None:
        coupled.append(CoupledParam(f"{target}.bias", 0))
    return coupled


def _chain_up(start: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """Nodes on the first-input chain from `start` up to (excluding) `stop`."""
    chain, node = [], start
    while node is not stop and len(chain) < 32:
        chain.append(node)
        inputs = gu.tensor_inputs(node)
        if not inputs:
            break
        node = inputs[0]
    return chain


def _constant_factor(node: fx.Node) -> float | None:
    """The numeric constant of a `x * c` node, if that is what it is."""
    if not gu.is_mul(node):
        return None
    constants = [a for a in node.args if isinstance(a, (int, float))]
    return float(constants[0]) if constants else None


def _core_inputs(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q, k, v, output) of an attention core, or None when `node` is not one."""
    if gu.is_sdpa(node):
        names = ("query", "key", "value")
        q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[names[i]] for i in range(3))
        return q, k, v, node
    if gu.is_softmax(node):
        scores, out = gu.walk_up(node, gu.is_matmul, 8), gu.walk_down(node, gu.is_matmul, 8)
        if scores is None or out is None or len(out.args) < 2:
            return None
        return scores.args[0], scores.args[1], out.args[1], out
    return None


def _attention_scale(core: fx.Node, q_chain: list[fx.Node], head_dim: int) -> float:
    if gu.is_sdpa(core):
        scale = core.kwargs.get("scale")
        return float(scale) if scale is not None else head_dim**-0.5
    factors = [f for f in map(_constant_factor, q_chain) if f is not None]
    scores_chain = _chain_up(core.args[0], stop=None) if core.args else []
    factors += [f for f in map(_constant_factor, scores_chain[:4]) if f is not None]
    return factors[0] if factors else 1.0


def _find_attention(gm: fx.GraphModule, core: fx.Node) -> tuple[AttentionStructure, fx.Node, fx.Node]:
    """Match the attention around `core`; returns it with the qkv and proj nodes."""
    q_in, k_in, v_in, out = _core_inputs(core)
    qkv = gu.walk_up(q_in, lambda n: gu.is_linear(gm, n))
    if qkv is None or gu.walk_up(v_in, lambda n: gu.is_linear(gm, n)) is not qkv:
        raise NotAViTError(
            f"attention at node {core.name!r}: expected q, k and v to come from one fused qkv Linear "
            f"(found {qkv.target if qkv is not None else 'none'} for q)"
        )
    proj = gu.walk_down(out, lambda n: gu.is_linear(gm, n), first_input_only=True)
    qkv_reshape = gu.walk_down(qkv, gu.is_reshape, 4)
    out_reshape = gu.walk_up(proj, gu.is_reshape, 6) if proj is not None else None
    q_shape, v_shape = shape_of(q_in), shape_of(v_in)
    if (proj is None or qkv_reshape is None or out_reshape is None or q_shape is None or len(q_shape) != 4
            or v_shape is None):
        raise NotAViTError(
            f"attention at node {core.name!r}: expected qkv → reshape to heads → attention → "
            "reshape → proj Linear"
        )
    q_chain, k_chain = _chain_up(q_in, qkv), _chain_up(k_in, qkv)
    q_norm = next((n.target for n in q_chain if gu.is_norm(gm, n)), None)
    k_norm = next((n.target for n in k_chain if gu.is_norm(gm, n)), None)
    _, num_heads, _, head_dim = q_shape
    attention = AttentionStructure(
        qkv=qkv.target, proj=proj.target, q_norm=q_norm, k_norm=k_norm,
        num_heads=int(num_heads), head_dim=int(head_dim), v_head_dim=int(v_shape[-1]),
        scale=_attention_scale(core, q_chain, int(head_dim)), fused=gu.is_sdpa(core),
        core_node=core.name, qkv_reshape_node=qkv_reshape.name, out_reshape_node=out_reshape.name,
    )
    return attention, qkv, proj


def _skip_passthrough(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    while gu.is_passthrough(gm, node):
        node = node.args[0]
    return node


def _residual_add(gm: fx.GraphModule, branch_out: fx.Node, stream: fx.Node, where: str
                  ) -> tuple[fx.Node, str | None]:
    """Follow a branch output to the add that joins it to `stream`; returns (add, layer-scale param)."""
    node, layer_scale = branch_out, None
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            break
        node = users[0]
        if gu.is_add(node):
            if stream in node.args:
                return node, layer_scale
            break
        params = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if gu.is_mul(node) and params:
            layer_scale = params[0].target
        elif not gu.is_passthrough(gm, node):
            break
    raise NotAViTError(f"{where}: expected its output to be added back to the residual stream "
                       f"({stream.name!r}), found {node.op} {node.target}")


def _norm_before(gm: fx.GraphModule, linear: fx.Node, where: str) -> fx.Node:
    norm = _skip_passthrough(gm, linear.args[0])
    if not gu.is_norm(gm, norm):
        raise NotAViTError(f"{where}: expected a norm layer before {linear.target!r}, found {norm.op} "
                           f"{norm.target}")
    return norm


def _find_mlp(gm: fx.GraphModule, stream: fx.Node, index: int) -> tuple[fx.Node, MlpStructure, fx.Node]:
    """Match norm2 → fc1 → act → fc2 hanging off the mid-block residual stream."""
    norm2 = next((u for u in stream.users if gu.is_norm(gm, u)), None)
    fc1 = gu.walk_down(norm2, lambda n: gu.is_linear(gm, n), 4) if norm2 is not None else None
    if fc1 is None:
        raise NotAViTError(f"block {index}: expected norm → fc1 Linear after the attention residual")
    act = next(iter(fc1.users))
    while gu.is_passthrough(gm, act):
        act = next(iter(act.users))
    fc2 = gu.walk_down(fc1, lambda n: gu.is_linear(gm, n), 8)
    if fc2 is None or act is fc2:
        raise NotAViTError(f"block {index}: expected fc1 → activation → fc2 in the MLP")
    between = [n for n in _chain_up(fc2.args[0], fc1) if gu.is_norm(gm, n)]
    mlp = MlpStructure(fc1=fc1.target, act_node=act.name, fc2=fc2.target,
                       norm=between[0].target if between else None,
                       hidden_dim=_linear(gm, fc1.target).out_features)
    return norm2, mlp, fc2


def _find_block(gm: fx.GraphModule, core: fx.Node, index: int) -> BlockStructure:
    attn, qkv, proj = _find_attention(gm, core)
    norm1 = _norm_before(gm, qkv, f"block {index}")
    stream_in = norm1.args[0]
    mid, ls1 = _residual_add(gm, proj, stream_in, f"block {index} attention")
    norm2, mlp, fc2 = _find_mlp(gm, mid, index)
    out, ls2 = _residual_add(gm, fc2, mid, f"block {index} MLP")
    return BlockStructure(
        index=index, norm1=norm1.target, attn=attn, layer_scale1=ls1, norm2=norm2.target, mlp=mlp,
        layer_scale2=ls2, input_node=stream_in.name, attn_residual_node=mid.name, output_node=out.name,
    )


def _block_coupled(gm: fx.GraphModule, block: BlockStructure) -> list[CoupledParam]:
    coupled = _module_coupled(gm, block.norm1, 0) + _module_coupled(gm, block.norm2, 0)
    coupled += [CoupledParam(f"{block.attn.qkv}.weight", 1), CoupledParam(f"{block.mlp.fc1}.weight", 1)]
    coupled += _module_coupled(gm, block.attn.proj, 0) + _module_coupled(gm, block.mlp.fc2, 0)
    coupled += [CoupledParam(p, 0) for p in (block.layer_scale1, block.layer_scale2) if p]
    return coupled


def _not_a_vit(gm: fx.GraphModule, reason: str) -> NotAViTError:
    kinds: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            name = type(gm.get_submodule(node.target)).__name__
            kinds[name] = kinds.get(name, 0) + 1
    found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:8])
    return NotAViTError(
        f"{reason}. Expected a Vision Transformer: Conv2d patch embedding → tokens → blocks of "
        "(norm → qkv Linear → attention → proj Linear → residual add; norm → fc1 → act → fc2 → "
        f"residual add) → norm → head. Found: {found or 'no modules'}"
    )


def _embedding(gm: fx.GraphModule, first_input: fx.Node) -> dict:
    """Patch embedding, prefix tokens, position embedding and their coupled tensors."""
    upstream = [n for n in gm.graph.nodes if n in set(gu.ancestors(first_input)) | {first_input}]
    convs = [n for n in upstream if gu.is_module(gm, n, nn.Conv2d)]
    tokens_shape, conv_shape = shape_of(first_input), shape_of(convs[0]) if convs else None
    if len(convs) != 1 or tokens_shape is None or len(tokens_shape) != 3 or conv_shape is None:
        raise _not_a_vit(gm, f"expected one Conv2d patch embedding before the first block, "
                             f"found {len(convs)}")
    num_patches = conv_shape[-1] * conv_shape[-2]
    seq_len, embed_dim = tokens_shape[1], tokens_shape[2]
    params = [n for n in upstream if n.op == "get_attr" and len(shape_of(n) or ()) == 3]
    pos = [n for n in params if shape_of(n)[1] in (seq_len, num_patches) and shape_of(n)[1] > 1]
    prefix = [n.target for n in params if n not in pos[:1]]
    coupled = _module_coupled(gm, convs[0].target, 0)
    coupled += [CoupledParam(n.target, 2) for n in params]
    for norm in (n for n in upstream if gu.is_norm(gm, n)):
        coupled += _module_coupled(gm, norm.target, 0)
    return dict(patch_embed=convs[0].target, num_patches=num_patches, embed_dim=embed_dim,
                num_prefix_tokens=seq_len - num_patches, prefix_params=tuple(prefix),
                pos_embed=pos[0].target if pos else None, coupled=coupled)


def _is_token_select(node: fx.Node) -> bool:
    """`x[:, i]`: picks one token of a (B, N, C) tensor."""
    index = node.args[1] if node.op == "call_function" and node.target is operator.getitem else None
    return isinstance(index, tuple) and len(index) >= 2 and isinstance(index[1], int)


def _head(gm: fx.GraphModule, last_output: fx.Node) -> dict:
    """Final norm, pooling kind and classifier heads after the last block."""
    downstream = [n for n in gm.graph.nodes if n in set(gu.descendants(last_output))]
    norms = [n.target for n in downstream if gu.is_norm(gm, n)]
    heads = [n.target for n in downstream if gu.is_linear(gm, n)]
    if any(gu.is_mean(n) for n in downstream):
        pool = "avg"
    elif any(_is_token_select(n) for n in downstream):
        pool = "token"
    else:
        pool = "none"
    coupled = [c for t in norms for c in _module_coupled(gm, t, 0)]
    coupled += [CoupledParam(f"{t}.weight", 1) for t in heads]
    return dict(final_norm=norms[0] if norms else None, heads=tuple(heads), pool=pool, coupled=coupled)


def find_vit_structure(gm: fx.GraphModule) -> ViTStructure:
    """Describe the ViT in `gm` (blocks, heads, prefix tokens, residual coupling) from graph patterns.

    Raises NotAViTError naming what was found when the graph is not a pre-norm ViT.
    """
    propagate_shapes(gm)
    cores = [n for n in gm.graph.nodes if _core_inputs(n) is not None]
    if not cores:
        raise _not_a_vit(gm, "no self-attention found (neither scaled_dot_product_attention nor "
                             "matmul → softmax → matmul)")
    blocks = tuple(_find_block(gm, core, i) for i, core in enumerate(cores))
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        # a registered transparent module (e.g. a token selection) may sit between two blocks
        if prev.output_node != _skip_passthrough(gm, gu.node_by_name(gm, nxt.input_node)).name:
            raise _not_a_vit(gm, f"block {nxt.index} does not take block {prev.index}'s output as its "
                                 "input: the blocks are not one residual stream")
    embed = _embedding(gm, gu.node_by_name(gm, blocks[0].input_node))
    head = _head(gm, gu.node_by_name(gm, blocks[-1].output_node))
    coupled = embed.pop("coupled") + [c for b in blocks for c in _block_coupled(gm, b)] + head.pop("coupled")
    return ViTStructure(input_shape=input_shape_of(gm), blocks=blocks, residual_coupled=tuple(coupled),
                        **embed, **head)
