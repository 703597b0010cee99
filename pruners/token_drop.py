"""Token dropping between blocks (Adaptive Sparse ViT, Liu et al. 2022), static keep counts.

Before each chosen block a `TokenSelect` keeps the prefix tokens (class, distillation, registers)
and the `keep` patch tokens the preceding block scored highest. The score (`ClassAttentionScore`)
is AS-ViT's: the class token's attention to each token, per head, weighted by the L2 norm of that
head's output at the token (normalised across heads), summed over heads. Fused attention never
forms the attention probabilities, so only the class-token row, q_cls·Kᵀ, is recomputed; spelled-
out attention hands its probabilities over as they are.

Keep counts are constants (`keep_rate` of the tokens reaching each stage), so the selection exports
as TopK + Gather with a fixed k: batches work and DeepSparse runs it. With `fuse`, the dropped
tokens are not lost but averaged, weighted by their scores, into one extra token (EViT). A model
without a class token (average pooling) is refused: AS-ViT's score is the class token's attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from vitsparse.compiler import (
    GraphPass,
    PassError,
    PassRecord,
    PassResult,
    RecipeError,
    ViTStructure,
    register_pass,
)
from vitsparse.compiler import graph_utils as gu
from vitsparse.compiler.attention_rewrite import key_input, query_input

REFERENCE_DEPTH = 12
REFERENCE_LOCATIONS = (4, 7, 10)  # 0-based: before the 5th, 8th and 11th block of a 12-block model


class ClassAttentionScore(nn.Module):
    """(B, patch tokens) scores from one block's attention: class-token attention × head-output norm."""

    def __init__(self, num_prefix_tokens: int, scale: float, fused: bool) -> None:
        super().__init__()
        self.num_prefix_tokens, self.scale, self.fused = num_prefix_tokens, scale, fused

    def class_attention(self, query: torch.Tensor, key_or_probs: torch.Tensor) -> torch.Tensor:
        """(B, heads, N): the class token's attention probabilities, recomputed when fused."""
        if not self.fused:  # spelled out: the softmax output itself
            return key_or_probs[:, :, 0]
        logits = (query[:, :, :1] @ key_or_probs.transpose(-2, -1)) * self.scale
        return logits.softmax(dim=-1)[:, :, 0]

    def weigh(self, class_attention: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        """(B, patches): each head's class-token attention weighted by its output norm share, summed."""
        norms = head_out.norm(dim=-1)  # (B, heads, N)
        weights = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (class_attention * weights).sum(dim=1)[:, self.num_prefix_tokens:]

    def forward(self, query: torch.Tensor, key_or_probs: torch.Tensor, head_out: torch.Tensor
                ) -> torch.Tensor:
        return self.weigh(self.class_attention(query, key_or_probs), head_out)

    def extra_repr(self) -> str:
        return f"prefix={self.num_prefix_tokens}, scale={self.scale:.4g}, fused={self.fused}"


@gu.register_transparent
class TokenSelect(nn.Module):
    """Keep the prefix tokens and the `keep` highest-scored patch tokens of a (B, N, C) stream; with
    `fuse`, append the dropped tokens' score-weighted mean as one more token (as EViT does)."""

    def __init__(self, keep: int, num_prefix_tokens: int, fuse: bool = False) -> None:
        super().__init__()
        self.keep, self.num_prefix_tokens, self.fuse = keep, num_prefix_tokens, fuse

    def forward(self, tokens: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        prefix, patches = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        count = patches.shape[1]
        if self.keep >= count:
            return tokens
        ranked = score.topk(self.keep, dim=1)  # (B, keep), best first
        kept = [prefix, _rows(patches, ranked.indices)]
        if self.fuse:
            kept.append(_fused_token(patches, score, ranked.values[:, -1:]))
        return torch.cat(kept, dim=1)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, prefix={self.num_prefix_tokens}, fuse={self.fuse}"


@gu.register_transparent
class ThresholdSelect(nn.Module):
    """Adaptive selection for one image at a time: keep the prefix tokens and every patch token whose
    score, over the mean score of the patch tokens present, reaches `threshold` (at least the best one).
    The token count follows the image, so it runs on PyTorch and ONNX Runtime at batch 1."""

    def __init__(self, threshold: float, num_prefix_tokens: int) -> None:
        super().__init__()
        self.threshold, self.num_prefix_tokens = float(threshold), num_prefix_tokens

    def forward(self, tokens: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        torch._assert(tokens.shape[0] == 1, "adaptive token dropping keeps a different number of tokens per "
                      "image, so it runs one image at a time (batch 1); use static keep counts for batches")
        normalised = score[0] / score[0].mean().clamp_min(1e-12)
        bar = torch.minimum(normalised.max(), torch.tensor(self.threshold, dtype=normalised.dtype))
        kept = torch.nonzero(normalised >= bar).reshape(-1)
        patches = tokens[:, self.num_prefix_tokens:].index_select(1, kept)
        return torch.cat([tokens[:, :self.num_prefix_tokens], patches], dim=1)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}, prefix={self.num_prefix_tokens}"


def _fused_token(patches: torch.Tensor, score: torch.Tensor, bar: torch.Tensor) -> torch.Tensor:
    """(B, 1, C): the score-weighted mean of the patch tokens scored below `bar`, the lowest kept score
    (a token tied with it but not kept is left out). One masked product: ranking every token and
    gathering the dropped rows crashes DeepSparse 1.8's compiler at batch > 1 (pyramid.cpp:3344)."""
    weights = score * (score < bar).to(score.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return weights.unsqueeze(1) @ patches


def _rows(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, C) rows `index` (B, K) of each image, as one Gather over the flattened batch."""
    batch, count, width = patches.shape
    offsets = torch.arange(batch, device=index.device).unsqueeze(1) * count
    flat = patches.reshape(batch * count, width).index_select(0, (index + offsets).reshape(-1))
    return flat.reshape(batch, index.shape[1], width)


def scale_locations(reference: Sequence[int], depth: int) -> tuple[int, ...]:
    """Stage locations given for a 12-block model, moved to the same relative depth of a `depth`-block
    one: each rounds to the nearest block in [1, depth) and stages that land together merge."""
    if depth < 2:
        return ()
    return tuple(sorted({min(max(round(loc * depth / REFERENCE_DEPTH), 1), depth - 1) for loc in reference}))


def default_locations(depth: int) -> tuple[int, ...]:
    """AS-ViT's stages (before blocks 4, 7, 10 of 12, 0-based) scaled to `depth` blocks."""
    return scale_locations(REFERENCE_LOCATIONS, depth)


def check_keep_rate(keep_rate: float) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must lie in (0, 1] (the share of tokens each stage keeps), got "
                         f"{keep_rate!r}")
    return float(keep_rate)


def check_locations(locations: Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices to drop tokens before: increasing, each in [1, depth) (a stage needs a block
    before it to score the tokens)."""
    values = tuple(locations)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"locations must be block indices (ints), got {values!r}")
    if any(not 1 <= v < depth for v in values):
        raise ValueError(f"locations {values} lie outside blocks 1..{depth - 1} of this {depth}-block "
                         "model (0-based; tokens are scored by the block before)")
    if list(values) != sorted(set(values)):
        raise ValueError(f"locations must be strictly increasing, got {values}")
    return values


def keep_counts(num_patches: int, keep_rate: float, stages: int, fuse: bool = False) -> tuple[int, ...]:
    """Patch tokens kept at each stage: `keep_rate` of those reaching it (with `fuse`, the fused token
    of the stage before counts as one), at least one."""
    counts, tokens = [], num_patches
    for _ in range(stages):
        kept = max(1, round(keep_rate * tokens))
        counts.append(kept)
        tokens = kept + (fuse and kept < tokens)
    return tuple(counts)


def _tokens_per_stage(num_patches: int, kept: Sequence[int], fuse: bool) -> list[int]:
    """Patch tokens entering the first stage, then leaving each (a fused token counts as one)."""
    tokens = [num_patches]
    for count in kept:
        dropped_any = count < tokens[-1]  # a stage that keeps everything passes its tokens through
        tokens.append(count + int(fuse) if dropped_any else tokens[-1])
    return tokens


def attention_nodes(gm: fx.GraphModule, block) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(q, k or the softmax probabilities, per-head output) of a block's attention core."""
    attention = block.attn
    core = gu.node_by_name(gm, attention.core_node)
    if gu.is_sdpa(core):
        return query_input(gm, attention), key_input(gm, attention), core
    return query_input(gm, attention), core, gu.walk_down(core, gu.is_matmul, 8)


def _insert_stage(gm: fx.GraphModule, structure: ViTStructure, location: int, select: nn.Module) -> None:
    scored_by = structure.blocks[location - 1]
    query, key_or_probs, head_out = attention_nodes(gm, scored_by)
    score_target, select_target = f"token_score_{location}", f"token_select_{location}"
    gm.add_submodule(score_target, ClassAttentionScore(structure.num_prefix_tokens, scored_by.attn.scale,
                                                       scored_by.attn.fused))
    gm.add_submodule(select_target, select)
    with gm.graph.inserting_after(head_out):
        score = gm.graph.call_module(score_target, (query, key_or_probs, head_out))
    stream = gu.node_by_name(gm, structure.blocks[location].input_node)
    with gm.graph.inserting_after(stream):
        selected = gm.graph.call_module(select_target, (stream, score))
    stream.replace_all_uses_with(selected, delete_user_cb=lambda user: user is not selected)


@register_pass
class TokenDropPass(GraphPass):
    """Insert token selection before `locations`. Each stage keeps `keep_rate` of its tokens (fixed);
    or, given learned `thresholds`, the mean count its threshold keeps on `calibration` images
    (learned), or with `adaptive`, every token above its threshold, image by image (batch 1 only).
    `fuse` adds one token fusing those a static stage drops."""

    name = "token-drop"

    def __init__(self, keep_rate: float | None = None, locations: Sequence[int] | None = None, *,
                 fuse: bool = False, thresholds: Sequence[float] | None = None,
                 calibration: Iterable[torch.Tensor] | torch.Tensor | None = None, adaptive: bool = False,
                 kept: Sequence[int] | None = None) -> None:
        if (keep_rate is None) == (thresholds is None) and kept is None:
            raise ValueError("give TokenDropPass either a keep_rate (fixed) or learned thresholds, not "
                             f"{'both' if keep_rate is not None else 'neither'}")
        if adaptive and (thresholds is None or fuse):
            raise ValueError("adaptive token dropping needs learned thresholds and cannot fuse tokens")
        if thresholds is not None and not adaptive and calibration is None and kept is None:
            raise ValueError("learned thresholds need calibration images to read the keep counts on "
                             "(or adaptive=True to apply them image by image)")
        self.keep_rate = check_keep_rate(keep_rate) if keep_rate is not None else None
        self.fuse, self.adaptive = bool(fuse), bool(adaptive)
        self.locations = tuple(locations) if locations is not None else None
        self.thresholds = tuple(float(t) for t in thresholds) if thresholds is not None else None
        self.calibration = [calibration] if isinstance(calibration, torch.Tensor) else calibration
        self.replay_kept = tuple(kept) if kept is not None else None

    @property
    def mode(self) -> str:
        return "adaptive" if self.adaptive else "learned" if self.thresholds is not None else "fixed"

    def _check_model(self, gm: fx.GraphModule, structure: ViTStructure) -> tuple[int, ...]:
        """The stages' locations, after refusing a model this pass cannot serve."""
        if structure.pool != "token" or structure.num_prefix_tokens < 1:
            raise PassError(f"token dropping scores tokens by the class token's attention; this model pools "
                            f"{structure.pool!r} with {structure.num_prefix_tokens} prefix tokens (no class "
                            "token to read)")
        if any(gu.is_module(gm, n, (TokenSelect, ThresholdSelect)) for n in gm.graph.nodes):
            raise PassError("this graph already drops tokens; apply TokenDropPass once")
        if structure.depth < 2:
            raise PassError("token dropping needs at least two blocks: the block before a stage scores its "
                            f"tokens, and this model has {structure.depth}")
        locations = check_locations(self.locations if self.locations is not None
                                    else default_locations(structure.depth), structure.depth)
        if self.thresholds is not None and len(self.thresholds) != len(locations):
            raise PassError(f"{len(self.thresholds)} learned thresholds for {len(locations)} token-drop "
                            f"locations {locations}; give one threshold per stage")
        return locations

    def _kept(self, gm: fx.GraphModule, structure: ViTStructure, locations: tuple[int, ...]
              ) -> tuple[int, ...]:
        if self.replay_kept is not None:
            kept = self.replay_kept
        elif self.thresholds is not None:
            from .token_thresholds import keep_counts_from_thresholds  # it builds on this module
            kept = keep_counts_from_thresholds(gm, locations, self.thresholds, self.calibration)
        else:
            kept = keep_counts(structure.num_patches, self.keep_rate, len(locations), self.fuse)
        if len(kept) != len(locations) or any(not 0 < k <= structure.num_patches for k in kept):
            raise PassError(f"keep counts {kept} do not fit locations {locations} of a model with "
                            f"{structure.num_patches} patch tokens")
        return kept

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        locations = self._check_model(gm, structure)
        params = {"keep_rate": self.keep_rate, "locations": list(locations), "fuse": self.fuse,
                  "mode": self.mode}
        if self.adaptive:
            prefix = structure.num_prefix_tokens
            for location, threshold in zip(locations, self.thresholds, strict=True):
                _insert_stage(gm, structure, location, ThresholdSelect(threshold, prefix))
            params["thresholds"] = list(self.thresholds)
            return PassResult(gm, PassRecord(self.name, params=params))
        kept = self._kept(gm, structure, locations)
        for location, keep in zip(locations, kept, strict=True):
            _insert_stage(gm, structure, location, TokenSelect(keep, structure.num_prefix_tokens, self.fuse))
        tokens = _tokens_per_stage(structure.num_patches, kept, self.fuse)
        stats = {"tokens_per_stage": tokens}
        if self.thresholds is not None:
            params["thresholds"] = list(self.thresholds)
            params["keep_rate"] = round(_mean_keep_rate(tokens, kept), 4)
            if self.replay_kept is None:
                stats["calibration_samples"] = _count_images(self.calibration)
        return PassResult(gm, PassRecord(self.name, params=params, decisions={"kept_tokens": list(kept)},
                                         stats=stats))

    @classmethod
    def from_record(cls, record: PassRecord) -> TokenDropPass:
        try:
            params = record.params
            thresholds = params.get("thresholds")
            adaptive = params.get("mode") == "adaptive"
            return cls(None if thresholds is not None else params["keep_rate"], params["locations"],
                       fuse=params.get("fuse", False), thresholds=thresholds, adaptive=adaptive,
                       kept=None if adaptive else record.decisions["kept_tokens"])
        except (KeyError, ValueError, TypeError) as err:
            raise RecipeError(f"{record.name} record: {err}") from None


def _mean_keep_rate(tokens: Sequence[int], kept: Sequence[int]) -> float:
    """The mean over stages of kept / reaching (what a fixed keep rate would be)."""
    return sum(k / max(t, 1) for k, t in zip(kept, tokens, strict=False)) / max(len(kept), 1)


def _count_images(batches: Iterable[torch.Tensor]) -> int:
    return sum(batch.shape[0] for batch in batches)
