"""The combined recipe: every method that has landed, applied to one model in turn.

Dimension slicing (VTP), head-equal channel removal, static token dropping and unstructured magnitude
masks compose as passes of one recipe: shapes shrink first, then the sequence, then the weights
turn to zeros. On digits-vit VTP's scores are trained (λ·‖â‖₁) and the recipe is fine-tuned with
distillation; the head-channel indicators come from weight norms on both models (the channel search
trains for a whole fine-tune of its own), and the speed model, with random weights, gets every
choice from weight norms: its row measures the shapes and zeros the recipe yields. With `int8`, static
INT8 ends the recipe: on digits-vit after the fine-tune, followed by a quantization-aware one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.models import build_model, digits_loaders, evaluate
from vitsparse.pruners import (
    DEFAULT_TARGETS,
    DimensionSlicePass,
    HeadChannelSlicePass,
    HeadGatePass,
    QuantConfig,
    QuantizePass,
    ScoreGatePass,
    SparsityPass,
    TokenDropPass,
    finetune,
    indicators_from_weights,
    make_calibration,
    scores_from_weight_norms,
    sparse_train,
)
from vitsparse.pruners.token_drop import scale_locations

from .accuracy import CALIBRATION_IMAGES, MODEL, digits_finetune_config, export_row, make_row
from .int8 import OBSERVER as INT8_OBSERVER
from .int8 import QAT
from .schema import Row

METHOD = "combined"


@dataclass(frozen=True)
class CombinedSetting:
    """Each pass's setting; a pass set to 0 (or keep 1) is left out of the recipe."""

    vtp_rate: float = 0.2
    head_budget: float = 0.3
    keep_rate: float = 0.7
    sparsity: float = 0.8
    # sliced widths round to 16: DeepSparse 1.8's sparse kernels give wrong results on masked weights
    # whose input width is not a multiple of 16 (the runtime refuses such a file)
    multiple: int = 16
    int8: bool = False  # static INT8 last (calibrated; on digits-vit fine-tuned quantization-aware)
    # where tokens drop, as blocks of a 12-block model (scaled to the model's depth); None: AS-ViT's
    # (4, 7, 10). Earlier stages cut more: the blocks before the first drop see every token
    token_locations: tuple[int, ...] | None = None
    fuse_tokens: bool = False  # dropped tokens averaged into one (EViT) instead of lost
    int8_patch_embed: bool = False  # INT8 also covers the patch embedding (a ConvInteger on DeepSparse)

    def passes(self) -> list[str]:
        chosen = [("vtp", self.vtp_rate > 0), ("head-channels", self.head_budget > 0),
                  ("token-drop", self.keep_rate < 1), ("magnitude", self.sparsity > 0), ("int8", self.int8)]
        return [name for name, included in chosen if included]

    def settings(self) -> dict:
        settings = {"passes": self.passes(), "vtp_rate": self.vtp_rate, "head_budget": self.head_budget,
                    "keep_rate": self.keep_rate, "sparsity": self.sparsity, "multiple": self.multiple}
        if self.token_locations is not None:
            settings["token_locations"] = list(self.token_locations)
        if self.fuse_tokens:
            settings["fuse_tokens"] = True
        if self.int8 and self.int8_patch_embed:
            settings["int8_patch_embed"] = True
        return settings

    def quant_config(self) -> QuantConfig:
        """The INT8 pass's layers and observer."""
        targets = DEFAULT_TARGETS + (("patch_embed",) if self.int8_patch_embed else ())
        return QuantConfig(targets=targets, observer=INT8_OBSERVER)

    def token_drop_pass(self, depth: int) -> TokenDropPass:
        """Static token dropping at this setting's locations, scaled to a `depth`-block model."""
        locations = None if self.token_locations is None else scale_locations(self.token_locations, depth)
        return TokenDropPass(self.keep_rate, locations, fuse=self.fuse_tokens)


# every method at a heavier setting, tokens dropped from block 1 on (fused, which costs DeepSparse ~3 %
# and gains digits-vit ~3 pt), INT8 down to the patch embedding: measured on deit_small at batch 16,
# 10–11x dense PyTorch on DeepSparse where `CombinedSetting(int8=True)` gave ~3x (the first blocks, at
# full token count, cost most there: softmax, LayerNorm and shuffles, not the INT8 products)
SPEED_RECIPE = CombinedSetting(vtp_rate=0.4, head_budget=0.5, keep_rate=0.4, sparsity=0.9, int8=True,
                               token_locations=(1, 4, 7), fuse_tokens=True, int8_patch_embed=True)

# the speed model's INT8 export check: with random weights, tokens dropped before block 1 and an INT8
# patch embedding, torch's and ONNX's rounding (x·(1/s) against x/s) part by 0.13–0.16 in logits within
# ±1.8 on deit_small, over the export's 0.1 default (the trained digits-vit model exports within it)
SPEED_MODEL_QUANT_ATOL = 0.25


def apply_combined(manager: PassManager, setting: CombinedSetting, train_vtp=None, calibration=None) -> None:
    """Run the recipe's passes on `manager`'s graph; `train_vtp(gated)` trains VTP's scores (None: weight
    norms stand in); INT8 calibrates on `calibration`."""
    if setting.vtp_rate > 0:
        gated = manager.run(ScoreGatePass())
        (train_vtp or scores_from_weight_norms)(gated)
        manager.run(DimensionSlicePass(setting.vtp_rate, setting.multiple))
    if setting.head_budget > 0:
        gated = manager.run(HeadGatePass())
        indicators_from_weights(gated)
        manager.run(HeadChannelSlicePass(setting.head_budget, setting.multiple))
    if setting.keep_rate < 1:
        manager.run(setting.token_drop_pass(manager.structure.depth))
    if setting.sparsity > 0:
        manager.run(SparsityPass(saliency="magnitude", sparsity=setting.sparsity))
    if setting.int8:
        manager.run(QuantizePass(setting.quant_config(), calibration=calibration))


def combined_digits_row(setting: CombinedSetting, epochs: int, artifacts) -> Row:
    """digits-vit through the recipe: top-1 before and after the standard distilled fine-tune."""
    dense = build_model(MODEL, pretrained=True)
    loaders = digits_loaders()
    config = digits_finetune_config(epochs)
    manager = PassManager(trace(copy.deepcopy(dense)),
                          recipe=Recipe(base={"model": MODEL, "kwargs": {}, "pretrained": True}))

    def train_vtp(gated: torch.fx.GraphModule) -> None:
        sparse_train(gated, loaders.train, config, teacher=dense, progress=False)

    apply_combined(manager, replace(setting, int8=False), train_vtp)
    oneshot = evaluate(manager.graph_module, loaders.test).top1
    tuned = finetune(manager.graph_module, loaders.train, loaders.val, config, teacher=dense,
                     progress=False).model
    if setting.int8:
        manager = PassManager(tuned, recipe=manager.recipe)
        calibration = make_calibration(loaders.train, CALIBRATION_IMAGES)
        manager.run(QuantizePass(setting.quant_config(), calibration=calibration))
        tuned = finetune(manager.graph_module, loaders.train, loaders.val, QAT, teacher=dense,
                         progress=False).model
    row = make_row(METHOD, setting.settings(), tuned, evaluate(tuned, loaders.test).top1, oneshot)
    row.prune_seconds = round(sum(p.stats["seconds"] for p in manager.recipe.passes), 3)
    export_row(tuned, manager.recipe, row, artifacts)
    return row


def combined_speed_graph(model: torch.nn.Module, setting: CombinedSetting, recipe: Recipe,
                         calibration=None) -> PassManager:
    """The speed model through the recipe, every choice from weight norms (INT8 calibrated on
    `calibration`)."""
    manager = PassManager(trace(model), recipe=recipe)
    apply_combined(manager, setting, calibration=calibration)
    return manager
