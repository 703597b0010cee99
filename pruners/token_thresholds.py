"""Learned token-drop thresholds (AS-ViT): soft masks while training, keep counts for inference.

Training works on a copy of the graph in which nothing is removed. Each stage's `TokenGate` turns the
class-attention score into a keep mask, sigmoid((S − θ)/τ) with a straight-through hard mask in the
forward pass; a stage's mask is multiplied into the next stage's, and every block from a stage on
masks the dropped tokens out of its attention (`MaskedSoftmax`: the dropped keys get no probability).
S is the score times the number of patch tokens, so a token of average importance scores 1 and θ does
not depend on the image size. The loss is cross-entropy + distillation (KL) from the dense model +
|FLOPs ratio − target|, the FLOPs ratio counted from the masks with the model's own per-block costs.

The thresholds are then read on calibration images: the mean number of tokens each stage keeps becomes
that stage's constant keep count (`TokenDropPass(thresholds=...)`), so the exported model is the same
TopK + Gather as a fixed keep rate.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from vitsparse.compiler import PassError, ViTStructure, count_costs, find_vit_structure
from vitsparse.compiler import graph_utils as gu

from .finetune import FinetuneConfig, finetune
from .token_drop import (
    ClassAttentionScore,
    TokenSelect,
    attention_nodes,
    check_locations,
    default_locations,
)

CALIBRATION_BATCH = 64  # images per forward when reading scores or keep counts


class TokenGate(nn.Module):
    """One stage's learned threshold: (B, patches) scores → (B, prefix + patches) keep mask."""

    def __init__(self, num_prefix_tokens: int, threshold: float = 1.0, temperature: float = 0.1,
                 lr_scale: float = 50.0) -> None:
        super().__init__()
        self.num_prefix_tokens, self.temperature, self.lr_scale = num_prefix_tokens, temperature, lr_scale
        # θ = lr_scale · raw: a few hundred steps at the model's lr move θ across the score range
        self.raw_threshold = nn.Parameter(torch.tensor(threshold / lr_scale))
        self.kept: torch.Tensor | None = None  # the last forward's patch mask, for the FLOPs term
        self.normalised: torch.Tensor | None = None  # the last forward's scores, for initialisation

    @property
    def threshold(self) -> torch.Tensor:
        return self.raw_threshold * self.lr_scale

    def set_threshold(self, value: float) -> None:
        with torch.no_grad():
            self.raw_threshold.fill_(value / self.lr_scale)

    def forward(self, score: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        normalised = _normalised(score.detach(), previous, self.num_prefix_tokens)
        hard = (normalised >= self.threshold).to(score.dtype)
        if self.training:  # forward: the hard mask; backward: the soft mask's gradient
            soft = torch.sigmoid((normalised - self.threshold) / self.temperature)
            hard = hard + soft - soft.detach()
        if previous is not None:  # a token dropped earlier stays dropped
            hard = hard * previous[:, self.num_prefix_tokens:]
        self.kept, self.normalised = hard, normalised.detach()
        prefix = torch.ones(score.shape[0], self.num_prefix_tokens, dtype=score.dtype, device=score.device)
        return torch.cat([prefix, hard], dim=1)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold.detach()):.4g}, temperature={self.temperature:g}"


def _normalised(score: torch.Tensor, previous: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """Scores over the mean score of the tokens still kept: an average token scores 1 at every stage,
    whatever share of attention the prefix tokens take."""
    alive = previous[:, prefix:] if previous is not None else torch.ones_like(score)
    mean = (score * alive).sum(dim=1, keepdim=True) / alive.sum(dim=1, keepdim=True).clamp_min(1)
    return score / mean.clamp_min(1e-12)


class MaskedSoftmax(nn.Module):
    """Softmax over the keys of (B, heads, N, N) logits, giving dropped keys (mask 0) no probability.

    The kept probabilities are those of a softmax over the kept tokens alone, which is what the model
    computes once the dropped tokens are removed."""

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _masked_softmax(logits, mask)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keys = mask[:, None, None, :]
    # shifted by the largest *kept* logit, every kept weight is at most 1 and their sum at least 1; the
    # clamp changes no kept weight but caps a dropped key's at 1, so the straight-through gradient a
    # dropped key's mask gets stays bounded (unclamped, a key far above the kept ones gets ~e^Δ)
    shift = logits.detach().masked_fill(keys == 0, float("-inf")).amax(dim=-1, keepdim=True)
    weights = torch.exp((logits - shift).clamp_max(0)) * keys
    return weights / weights.sum(dim=-1, keepdim=True)


class MaskedAttention(nn.Module):
    """Fused attention's core spelled out with `MaskedSoftmax` (training only: it forms every score)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.softmax = MaskedSoftmax()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        return self.softmax(query @ key.transpose(-2, -1) * self.scale, mask) @ value


class MaskedClassAttentionScore(ClassAttentionScore):
    """`ClassAttentionScore` for a block whose attention is masked: the class row only over kept keys."""

    def forward(self, query: torch.Tensor, key_or_probs: torch.Tensor, head_out: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if not self.fused:  # the masked softmax's output already
            return self.weigh(key_or_probs[:, :, 0], head_out)
        logits = (query[:, :, :1] @ key_or_probs.transpose(-2, -1)) * self.scale
        return self.weigh(_masked_softmax(logits, mask)[:, :, 0], head_out)


def _mask_block(gm: fx.GraphModule, block, mask: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Rewrite one block's attention core to ignore masked keys; returns its new (q, k or probs, out)."""
    query, key_or_probs, head_out = attention_nodes(gm, block)
    core = gu.node_by_name(gm, block.attn.core_node)
    graph = gm.graph
    if gu.is_sdpa(core):
        target = f"token_masked_attention_{block.index}"
        gm.add_submodule(target, MaskedAttention(block.attn.scale))
        with graph.inserting_before(core):
            masked = graph.call_module(target, (query, key_or_probs, core.args[2], mask))
        core.replace_all_uses_with(masked)
        graph.erase_node(core)
        return query, key_or_probs, masked
    target = f"token_masked_softmax_{block.index}"
    gm.add_submodule(target, MaskedSoftmax())
    with graph.inserting_before(core):
        masked = graph.call_module(target, (core.args[0], mask))
    core.replace_all_uses_with(masked)
    graph.erase_node(core)
    return query, masked, head_out


def gated_copy(gm: fx.GraphModule, locations: Sequence[int], thresholds: Sequence[float],
               temperature: float = 0.1, lr_scale: float = 50.0) -> fx.GraphModule:
    """A copy of `gm` with a `TokenGate` per stage and masked attention from the first stage on; `gm` is
    untouched and the copy's other parameters carry the same names."""
    if any(gu.is_module(gm, node, TokenSelect) for node in gm.graph.nodes):
        raise PassError("this graph already drops tokens; learn thresholds on the graph before TokenDropPass")
    gated = copy.deepcopy(gm)
    structure = find_vit_structure(gated)
    locations = check_locations(locations, structure.depth)
    if len(thresholds) != len(locations):
        raise ValueError(f"{len(thresholds)} thresholds for {len(locations)} token-drop locations "
                         f"{locations}; give one threshold per stage")
    blocks, graph, mask, rewritten = structure.blocks, gated.graph, None, {}
    for stage, (location, threshold) in enumerate(zip(locations, thresholds, strict=True)):
        scored_by = blocks[location - 1]
        query, key_or_probs, head_out = rewritten.get(scored_by.index) or attention_nodes(gated, scored_by)
        score_module = (ClassAttentionScore if mask is None else MaskedClassAttentionScore)(
            structure.num_prefix_tokens, scored_by.attn.scale, scored_by.attn.fused)
        gated.add_submodule(f"token_score_{location}", score_module)
        gated.add_submodule(f"token_gate_{stage}", TokenGate(structure.num_prefix_tokens, threshold,
                                                             temperature, lr_scale))
        with graph.inserting_after(head_out):
            score_args = (query, key_or_probs, head_out) + ((mask,) if mask is not None else ())
            score = graph.call_module(f"token_score_{location}", score_args)
        with graph.inserting_after(score):
            mask = graph.call_module(f"token_gate_{stage}", (score,) + ((mask,) if stage else ()))
        end = locations[stage + 1] if stage + 1 < len(locations) else structure.depth
        for block in blocks[location:end]:
            rewritten[block.index] = _mask_block(gated, block, mask)
    graph.lint()
    gated.recompile()
    return gated


def token_gates(gm: nn.Module) -> list[TokenGate]:
    """The gates of a gated copy, stage by stage."""
    return [m for _, m in sorted(((n, m) for n, m in gm.named_modules() if isinstance(m, TokenGate)),
                                 key=lambda item: int(item[0].rsplit("_", 1)[-1]))]


@dataclass(frozen=True)
class TokenCosts:
    """MACs per image as a function of the tokens each block sees: fixed + Σ per_token·n + per_pair·n²."""

    fixed: float
    per_token: tuple[float, ...]
    per_pair: tuple[float, ...]
    tokens: int  # tokens every block sees without dropping

    def macs(self, tokens_per_block: Sequence[torch.Tensor | float]) -> torch.Tensor | float:
        return self.fixed + sum(a * n + b * n * n for a, b, n in
                                zip(self.per_token, self.per_pair, tokens_per_block, strict=True))

    @property
    def full(self) -> float:
        return self.macs([self.tokens] * len(self.per_token))


def token_costs(gm: fx.GraphModule, structure: ViTStructure) -> TokenCosts:
    """Each block's linear MACs per token and attention MACs per token pair, read off its modules."""
    per_token, per_pair = [], []
    for block in structure.blocks:
        linears = (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
        per_token.append(float(sum(gm.get_submodule(n).weight.shape.numel() for n in linears)))
        per_pair.append(float(block.attn.num_heads * (block.attn.head_dim + block.attn.v_head_dim)))
    tokens = structure.num_patches + structure.num_prefix_tokens
    in_blocks = sum(a * tokens + b * tokens * tokens for a, b in zip(per_token, per_pair, strict=True))
    return TokenCosts(count_costs(gm).macs - in_blocks, tuple(per_token), tuple(per_pair), tokens)


def flops_ratio(gated: nn.Module, costs: TokenCosts, locations: Sequence[int], num_prefix_tokens: int
                ) -> torch.Tensor:
    """MACs with the gates' last masks over MACs without dropping (differentiable through the masks)."""
    tokens: list[torch.Tensor | float] = [float(costs.tokens)] * len(costs.per_token)
    bounds = [*locations, len(costs.per_token)]
    for gate, start, end in zip(token_gates(gated), bounds, bounds[1:], strict=False):
        kept = gate.kept.sum(dim=1).mean() + num_prefix_tokens
        tokens[start:end] = [kept] * (end - start)
    return costs.macs(tokens) / costs.full


@dataclass(frozen=True)
class ThresholdConfig:
    """What threshold learning aims for and how: the FLOPs ratio to reach (pruned / before), the stages,
    the mask temperature τ, the loss weights (AS-ViT: 1.0 CE, 2.0 FLOPs, 0.5 distillation) and how
    much faster than the weights the thresholds learn."""

    target_ratio: float
    locations: tuple[int, ...] | None = None
    temperature: float = 0.1
    ce_weight: float = 1.0
    flops_weight: float = 2.0
    distill_weight: float = 0.5
    lr_scale: float = 50.0  # θ moves lr_scale times faster than the weights

    def __post_init__(self) -> None:
        if isinstance(self.target_ratio, bool) or not 0 < self.target_ratio <= 1:
            raise ValueError(f"target_ratio must lie in (0, 1] (pruned FLOPs / FLOPs before), got "
                             f"{self.target_ratio!r}")
        weights = (self.ce_weight, self.flops_weight, self.distill_weight)
        if min(weights) < 0 or self.ce_weight + self.distill_weight == 0:
            raise ValueError(f"loss weights must be >= 0 with CE or distillation > 0, got {weights}")
        if self.temperature <= 0 or self.lr_scale <= 0:
            raise ValueError(f"temperature and lr_scale must be > 0, got {self.temperature}, {self.lr_scale}")


@dataclass(frozen=True)
class LearnedThresholds:
    """What threshold learning found: one threshold per stage, and the FLOPs ratio of its last step."""

    locations: tuple[int, ...]
    thresholds: tuple[float, ...]
    initial: tuple[float, ...]
    final_ratio: float
    steps: int
    seconds: float


def initial_thresholds(gm: fx.GraphModule, locations: Sequence[int], keep_rate: float,
                       images: torch.Tensor, config: ThresholdConfig) -> tuple[float, ...]:
    """Thresholds that keep `keep_rate` of the tokens reaching each stage on `images`, stage by stage."""
    thresholds = [0.0] * len(locations)  # 0 keeps every token
    gated = gated_copy(gm, locations, thresholds, config.temperature, config.lr_scale).eval()
    for stage in range(len(locations)):  # one copy: each stage's threshold is set before the next is read
        alive = torch.cat([gates[stage].normalised[gates[stage].kept > 0].cpu()  # kept by earlier stages
                           for gates in _gates_per_batch(gated, images.split(CALIBRATION_BATCH))])
        thresholds[stage] = float(alive.quantile(1 - keep_rate)) if alive.numel() else 0.0
        token_gates(gated)[stage].set_threshold(thresholds[stage])
    return tuple(thresholds)


def _gates_per_batch(gated: fx.GraphModule, batches: Iterable[torch.Tensor]) -> Iterator[list[TokenGate]]:
    """Run the gated copy (no gradients) on each batch, on its own device; yield its gates after each."""
    device = next(gated.parameters()).device
    with torch.no_grad():
        for batch in batches:
            gated(batch.to(device))
            yield token_gates(gated)


def learn_thresholds(gm: fx.GraphModule, train_loader, config: ThresholdConfig,
                     finetune_config: FinetuneConfig, calibration: torch.Tensor,
                     teacher: nn.Module | None = None, progress: bool = True) -> LearnedThresholds:
    """Train one threshold per stage jointly with `gm`'s weights (updated in place) toward
    `config.target_ratio`; thresholds start where every stage keeps the same share of its tokens."""
    structure = find_vit_structure(gm)
    locations = check_locations(config.locations if config.locations is not None
                                else default_locations(structure.depth), structure.depth)
    costs = token_costs(gm, structure)
    keep_rate = keep_rate_for_ratio(costs, locations, structure.num_prefix_tokens, config.target_ratio)
    initial = initial_thresholds(gm, locations, keep_rate, calibration, config)
    gated = gated_copy(gm, locations, initial, config.temperature, config.lr_scale)
    # finetune mixes CE and KL as (1 − α)·CE + α·KL: the same weights, divided by their sum
    scale = config.ce_weight + (config.distill_weight if teacher is not None else 0.0)

    def budget() -> torch.Tensor:
        ratio = flops_ratio(gated, costs, locations, structure.num_prefix_tokens)
        return config.flops_weight / scale * (ratio - config.target_ratio).abs()

    tune = replace(finetune_config, distill_alpha=config.distill_weight / scale if teacher else 0.0)
    started = time.perf_counter()
    result = finetune(gated, train_loader, None, tune, teacher=teacher, progress=progress, regularizer=budget)
    seconds = time.perf_counter() - started
    weights = gated.state_dict()
    gm.load_state_dict({name: weights[name] for name in gm.state_dict()})
    final = statistics.fmean(float(flops_ratio(gated, costs, locations, structure.num_prefix_tokens))
                             for _ in _gates_per_batch(gated.eval(), calibration.split(CALIBRATION_BATCH)))
    thresholds = tuple(float(g.threshold.detach()) for g in token_gates(gated))
    return LearnedThresholds(locations, thresholds, initial, final, result.steps, round(seconds, 3))


def keep_rate_for_ratio(costs: TokenCosts, locations: Sequence[int], prefix: int, target: float) -> float:
    """The keep rate that, applied at every stage, reaches `target` FLOPs ratio (bisection; token counts
    taken as real numbers, so the rounded counts of a static pass land close to, not on, the ratio)."""
    patches = costs.tokens - prefix
    low, high = 0.0, 1.0
    for _ in range(40):
        rate = (low + high) / 2
        tokens = [float(costs.tokens)] * len(costs.per_token)
        bounds, kept = [*locations, len(costs.per_token)], float(patches)
        for start, end in zip(bounds, bounds[1:], strict=False):
            kept *= rate
            tokens[start:end] = [kept + prefix] * (end - start)
        low, high = (rate, high) if costs.macs(tokens) / costs.full < target else (low, rate)
    return max(high, 1e-3)


def keep_counts_from_thresholds(gm: fx.GraphModule, locations: Sequence[int], thresholds: Sequence[float],
                                images: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Each stage's mean number of kept patch tokens over `images`, at least one: the static keep counts."""
    gated = gated_copy(gm, locations, thresholds).eval()
    totals, count = torch.zeros(len(locations)), 0
    for gates in _gates_per_batch(gated, images):
        totals += torch.stack([g.kept.sum() for g in gates]).cpu()
        count += gates[0].kept.shape[0]
    if count == 0:
        raise ValueError("no calibration images to read the learned thresholds on")
    return tuple(max(1, round(float(t) / count)) for t in totals)
