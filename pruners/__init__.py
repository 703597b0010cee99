"""Pruning methods as graph passes, plus what they need while training (masks, fine-tuning, distillation)."""

from .calibration import Calibration, make_calibration
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .head_channels import (
    VARIANTS as HEAD_CHANNEL_VARIANTS,
)
from .head_channels import (
    HeadChannelSlicePass,
    indicators_from_weights,
    search_head_channels,
)
from .head_gates import HeadChannelGate, HeadGatePass
from .losses import distillation_loss
from .magnitude import MagnitudePass
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
from .obs_fisher import FisherObsSettings
from .obs_layerwise import LayerwiseObsSettings
from .patterns import Pattern, check_mask_pattern, parse_pattern
from .quantize import QuantConfig, QuantizePass
from .saliency import SALIENCIES, SCOPE_NAMES, SaliencyRequest, check_sparsity, register_saliency
from .sparsity_pass import SparsityConfig, SparsityPass
from .targets import DEFAULT_TARGETS, TARGET_KINDS, select_targets
from .token_drop import ClassAttentionScore, TokenDropPass, TokenSelect
from .token_thresholds import LearnedThresholds, ThresholdConfig, TokenGate, learn_thresholds
from .vtp import (
    DimensionSlicePass,
    ScoreGate,
    ScoreGatePass,
    score_l1,
    scores_from_weight_norms,
    sparse_train,
)
from .vtp_sites import SITE_NAMES, SITES, Site, register_site

__all__ = [
    "Calibration", "DEFAULT_TARGETS", "FinetuneConfig", "FinetuneResult", "FisherObsSettings",
    "LayerwiseObsSettings",
    "MagnitudePass", "MaskPass", "MaskedConv2d", "MaskedLinear", "Pattern", "SALIENCIES", "SCOPE_NAMES",
    "QuantConfig", "QuantizePass", "SaliencyRequest", "SparsityConfig", "SparsityPass", "TARGET_KINDS",
    "apply_masks_",
    "check_mask_pattern", "check_sparsity", "decode_mask", "distillation_loss", "encode_mask", "finetune",
    "install_mask", "make_calibration", "mask_digest", "mask_sparsity", "masked_modules", "parse_pattern",
    "register_saliency", "select_targets",
    "DimensionSlicePass", "SITES", "SITE_NAMES", "ScoreGate", "ScoreGatePass", "Site", "register_site",
    "score_l1", "scores_from_weight_norms", "sparse_train",
    "HEAD_CHANNEL_VARIANTS", "HeadChannelGate", "HeadChannelSlicePass", "HeadGatePass",
    "indicators_from_weights", "search_head_channels",
    "ClassAttentionScore", "TokenDropPass", "TokenSelect",
    "LearnedThresholds", "ThresholdConfig", "TokenGate", "learn_thresholds",
]
