"""Pruning methods as graph passes, plus what they need while training (masks, fine-tuning, distillation)."""

from .finetune import FinetuneConfig, FinetuneResult, finetune
from .losses import distillation_loss
from .magnitude import SCOPES, MagnitudeConfig, MagnitudePass, check_sparsity
from .mask_codec import decode_mask, encode_mask
from .mask_pass import MaskPass
from .masked import (
    MaskedConv2d,
    MaskedLinear,
    apply_masks_,
    install_mask,
    mask_digest,
    mask_sparsity,
    masked_modules,
)
from .targets import DEFAULT_TARGETS, TARGET_KINDS, select_targets

__all__ = [
    "DEFAULT_TARGETS", "FinetuneConfig", "FinetuneResult", "MagnitudeConfig", "MagnitudePass", "MaskPass",
    "MaskedConv2d", "MaskedLinear", "SCOPES", "TARGET_KINDS", "apply_masks_", "check_sparsity",
    "decode_mask", "distillation_loss", "encode_mask", "finetune", "install_mask",
    "mask_digest", "mask_sparsity", "masked_modules", "select_targets",
]
