"""Head-equal channel removal in multi-head attention (Automatic Channel Pruning for MHA, Lee & Hwang 2024).

Removing q, k and v channels independently leaves heads of different widths and breaks the head
reshape. This method removes the same number of channels from every head, so attention stays a
batched matmul with a smaller head dimension. Three steps:

1. `HeadGatePass` puts indicators on q (one per q–k pair) and v in every head (`head_gates`).
2. `search_head_channels` initialises them (attention difference, channel similarity) and trains
   them toward the MAC budget: the hard keep masks follow a budget that ramps up to the target
   after a warm-up at full width (`ramp_share`), the task loss (distilled from the dense model)
   reaches the indicators straight through the masks and trains the reweight scales. Variants
   switch the parts off for the ablations (`VARIANTS`).
3. `HeadChannelSlicePass` selects at the budget (`head_select`), folds the reweight scales into the
   qkv rows (or the q norm), removes the gates and slices qkv rows, q/k/v head widths, proj columns
   and q/k norms; the attention scale stays the original model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

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
    find_vit_structure,
    register_pass,
    scale_query_channels,
    scale_value_channels,
    slice_qk_heads,
    slice_value_heads,
)
from vitsparse.compiler.flops import attention_macs

from .calibration import make_calibration
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .head_gates import HeadChannelGate, all_gates, gate_key, gates_of
from .head_select import check_budget, choose_head_channels, gate_nodes, set_keep_masks
from .head_signals import indicators_from, measure_signals, weight_importance
from .mask_codec import encode_mask, record_masks
from .vtp import check_multiple

DEFAULT_MULTIPLE = 8
DEFAULT_L1 = 1e-4  # the plain-L1 ablation's λ (as VTP's)
# (start, end) fractions of the search steps: full width before start, the removed share ramping linearly
# to the budget between them, the target budget after end (a warm-up lets the indicators learn first)
DEFAULT_RAMP = (0.25, 0.75)
CALIBRATION_IMAGES = 128  # images the similarity weights and the initialisation see
SIGNAL_BATCH = 16  # images per forward while measuring them (spelled-out attention keeps (B, H, N, N) twice)
INIT_RANGE = (1.0, 4.0)  # indicators from the attention difference: σ from 0.73 (least) to 0.98 (most)


@dataclass(frozen=True)
class Variant:
    """Which parts of the method a run uses (the full method or one of the ablations)."""

    gate_mode: str = "mask"  # "scale": a plain L1-trained indicator
    similarity: bool = True
    reweight: bool = True
    init: bool = True


VARIANTS: dict[str, Variant] = {
    "full": Variant(),
    "l1": Variant(gate_mode="scale", similarity=False, reweight=False, init=False),
    "no-similarity": Variant(similarity=False),
    "no-reweight": Variant(reweight=False),
    "no-init": Variant(init=False),
}


def check_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown head-channel variant {name!r}; choose from "
                         f"{', '.join(VARIANTS)}") from None


def _fold_and_remove(gm: fx.GraphModule, structure: ViTStructure) -> None:
    """Fold every gate's kept-channel scales into the weights and route its input straight through."""
    for block in structure.blocks:
        gates = gates_of(gm, block.attn)
        scale_query_channels(gm, block.attn, gates["qk"].fold_factors())
        scale_value_channels(gm, block.attn, gates["v"].fold_factors())
    for node in gate_nodes(gm):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)


def _slice_block(gm: fx.GraphModule, structure: ViTStructure, index: int,
                 kept: dict[str, torch.Tensor]) -> None:
    attn = structure.blocks[index].attn
    qk, v = kept[gate_key(index, "qk")], kept[gate_key(index, "v")]
    qk = qk.expand(attn.num_heads, -1)  # one set shared by every head (q/k norm) or one per head
    if v.shape[1] < attn.v_head_dim:
        slice_value_heads(gm, attn, v)
        attn = replace(attn, v_head_dim=v.shape[1])
    if qk.shape[1] < attn.head_dim:
        slice_qk_heads(gm, attn, qk)


def _decisions(gm: fx.GraphModule, structure: ViTStructure, kept: dict[str, torch.Tensor]) -> dict:
    decisions = {}
    for key, gate in all_gates(gm, structure).items():
        mask = torch.zeros(gate.groups, gate.width, dtype=torch.bool)
        mask.scatter_(1, kept[key].cpu(), True)
        decisions[key] = {"shape": [gate.groups, gate.width], "kept": int(kept[key].shape[1]),
                          "mask": encode_mask(mask)}
    return decisions


def _checked_replay(kept: dict[str, torch.Tensor], gates: dict[str, HeadChannelGate]
                    ) -> dict[str, torch.Tensor]:
    """Recorded selections that fit the gates: the same keys, one row per gate group, channels in range."""
    if set(kept) != set(gates):
        raise RecipeError(f"head-channel-slice record does not match the gated blocks: "
                          f"{sorted(set(kept) ^ set(gates))[:6]}")
    for key, gate in gates.items():
        index = torch.as_tensor(kept[key], dtype=torch.long).cpu()
        if index.ndim != 2 or index.shape[0] != gate.groups or not 0 < index.shape[1] <= gate.width or (
                int(index.min()) < 0 or int(index.max()) >= gate.width):
            raise RecipeError(f"head-channel-slice record of {key!r} keeps channels of shape "
                              f"{tuple(index.shape)}, the gate there has {gate.groups} group(s) of "
                              f"{gate.width} channels")
    return {key: torch.as_tensor(index, dtype=torch.long).cpu() for key, index in kept.items()}


@register_pass
class HeadChannelSlicePass(GraphPass):
    """Select head-equal channels at `budget` fewer attention MACs, fold the gates' scales, slice."""

    name = "head-channel-slice"

    def __init__(self, budget: float, multiple: int = DEFAULT_MULTIPLE,
                 kept: dict[str, torch.Tensor] | None = None) -> None:
        self.budget, self.multiple = check_budget(budget), check_multiple(multiple)
        self.replay_kept = kept

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        gates = all_gates(gm, structure)
        if self.replay_kept is not None:
            kept = _checked_replay(self.replay_kept, gates)
            removed = None
        else:
            kept, removed = choose_head_channels(gm, structure, self.budget, self.multiple)
        before = attention_macs(gm, structure)
        decisions = _decisions(gm, structure, kept)
        _fold_and_remove(gm, structure)
        for block in structure.blocks:
            _slice_block(gm, structure, block.index, kept)
        stats = {"attention_macs_before": before}
        if removed is not None:
            stats["attention_removed_fraction"] = round(removed, 6)
        record = PassRecord(self.name, params={"budget": self.budget, "multiple": self.multiple},
                            decisions={"gates": decisions}, stats=stats)
        return PassResult(gm, record)

    @classmethod
    def from_record(cls, record: PassRecord) -> HeadChannelSlicePass:
        kept = {}
        for key, mask in record_masks(record, "gates", "shape").items():
            counts = mask.sum(dim=1)
            if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
                raise RecipeError(f"{record.name} record of gate {key!r} keeps unequal or no channels "
                                  "per head")
            kept[key] = mask.nonzero()[:, 1].view(mask.shape[0], -1)
        try:
            params = record.params
            return cls(params.get("budget", 0.0), params.get("multiple", DEFAULT_MULTIPLE), kept)
        except ValueError as err:
            raise RecipeError(f"{record.name} record: {err}") from None


@torch.no_grad()
def _prepare(gm: fx.GraphModule, structure: ViTStructure, spec: Variant, calibration) -> None:
    """Similarity weights and indicator initialisation from calibration activations, as `spec` asks."""
    gates = all_gates(gm, structure)
    for gate in gates.values():
        gate.reweight.requires_grad_(spec.reweight and spec.gate_mode == "mask")
    if not (spec.similarity or spec.init):
        return
    if calibration is None:
        raise ValueError("the similarity weights and the indicator initialisation need calibration images "
                         "(pass calibration=, e.g. a DataLoader of training images)")
    batches = make_calibration(calibration, CALIBRATION_IMAGES).images(SIGNAL_BATCH)
    signals = measure_signals(gm, structure, batches)
    if spec.similarity:
        for key, weights in signals.similarity.items():
            gates[key].similarity.copy_(weights)
    if spec.init:
        for key, indicator in indicators_from(signals.difference, *INIT_RANGE).items():
            gates[key].set_indicator(indicator)


def indicators_from_weights(gm: fx.GraphModule) -> None:
    """Data-free indicators from weight norms (a random-weight speed model has nothing to train on).

    Each gate's norms are taken relative to their own mean, so the budget is spread over q–k and v of
    every block about evenly (random weights say nothing about which block matters more), and within
    a gate the weaker channels go first."""
    structure = find_vit_structure(gm)
    gates = all_gates(gm, structure)
    signals = {gate_key(b.index, kind): value / value.mean().clamp_min(1e-12) for b in structure.blocks
               for kind, value in weight_importance(gm, b.attn).items()}
    for key, indicator in indicators_from(signals, *INIT_RANGE).items():
        gates[key].set_indicator(indicator if gates[key].mode == "mask" else indicator / INIT_RANGE[1])


def check_ramp(ramp: tuple[float, float]) -> tuple[float, float]:
    """ValueError unless `ramp` is (start, end) with 0 <= start < end <= 1."""
    try:
        start, end = (float(x) for x in ramp)
    except (TypeError, ValueError):
        raise ValueError(f"ramp must be (start, end) fractions of the search, got {ramp!r}") from None
    if not 0 <= start < end <= 1:
        raise ValueError(f"ramp must be (start, end) with 0 <= start < end <= 1, got {ramp!r}")
    return start, end


def ramp_share(step: int, total: int, ramp: tuple[float, float]) -> float:
    """The share of the budget removed at `step` (0-based) of `total`: 0 until `ramp[0]` of the steps have
    run, rising linearly to 1 at `ramp[1]`, 1 after."""
    start, end = ramp
    done = (step + 1) / max(1, total)
    return min(1.0, max(0.0, (done - start) / (end - start)))


def _budget_follower(gm: fx.GraphModule, structure: ViTStructure, budget: float, multiple: int,
                     ramp: tuple[float, float]):
    """before_step hook: the keep masks at the budget's share `ramp_share` gives the step."""
    def update(step: int, total: int) -> None:
        kept, _ = choose_head_channels(gm, structure, budget * ramp_share(step, total, ramp), multiple)
        set_keep_masks(gm, kept, structure)
    return update


def search_head_channels(gm: fx.GraphModule, train_loader: Iterable, config: FinetuneConfig, budget: float, *,
                         variant: str = "full", multiple: int = DEFAULT_MULTIPLE, calibration=None,
                         teacher: nn.Module | None = None, l1: float = DEFAULT_L1,
                         ramp: tuple[float, float] = DEFAULT_RAMP, progress: bool = True) -> FinetuneResult:
    """Initialise and train a gated model's indicators toward `budget` fewer attention MACs (see module doc).

    `calibration` (images or a loader) feeds the similarity weights and the initialisation; `variant`
    names the ablation. Afterwards the keep masks are the selection at the full budget (every variant),
    so the gated model computes what `HeadChannelSlicePass(budget, multiple)` will keep.
    """
    spec, budget = check_variant(variant), check_budget(budget)
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    ramp = check_ramp(ramp)
    structure = find_vit_structure(gm)
    modes = {gate.mode for gate in all_gates(gm, structure).values()}
    if modes != {spec.gate_mode}:
        raise PassError(f"variant {variant!r} trains gates in {spec.gate_mode!r} mode, the model has "
                        f"{sorted(modes)}: insert them with HeadGatePass(mode={spec.gate_mode!r})")
    choose_head_channels(gm, structure, budget, multiple)  # a budget that would empty a head fails now
    _prepare(gm, structure, spec, calibration)
    if spec.gate_mode == "scale":
        gates = list(all_gates(gm, structure).values())
        result = finetune(gm, train_loader, None, config, teacher=teacher, progress=progress,
                          regularizer=lambda: l1 * sum(g.indicator.abs().sum() for g in gates))
    else:
        result = finetune(gm, train_loader, None, config, teacher=teacher, progress=progress,
                          before_step=_budget_follower(gm, structure, budget, multiple, ramp))
    set_keep_masks(gm, choose_head_channels(gm, structure, budget, multiple)[0], structure)
    return result
