"""What each prune-and-bench profile runs: `default` (about an hour on 2 cores) and `full` (longer)."""

from __future__ import annotations

from dataclasses import dataclass

from vitsparse.pruners import HEAD_CHANNEL_VARIANTS

from .combined import COMBINED, COMBINED_SCHEDULE, FRONTIER, CombinedSetting
from .int8 import DEFAULT_SPEED as INT8_SPEED
from .int8 import TWIN_FORMATS, Int8SpeedSetting
from .methods import SpeedSetting
from .staged import StagedSchedule
from .token_drop import MODES as TOKEN_DROP_MODES
from .vtp import VtpSetting

PATTERNS = (SpeedSetting(0.9), SpeedSetting(0.5, "2:4"), SpeedSetting(0.75, "1x4"))


@dataclass(frozen=True)
class Profile:
    name: str
    accuracy_sparsities: tuple[float, ...]  # every method, one-shot and fine-tuned, on digits-vit
    speed_settings: tuple[SpeedSetting, ...]  # masks timed on the speed model
    batch_sizes: tuple[int, ...]
    rounds: int  # alternating timing rounds per batch size
    seconds_per_block: float  # consecutive calls per runner per round
    finetune_epochs: int
    solver_timing_samples: int  # calibration images when timing each solver on the speed model; 0 skips
    vtp_rates: tuple[float, ...] = (0.2, 0.4)  # VTP on digits-vit (trained scores)
    vtp_speed: tuple[VtpSetting, ...] = (VtpSetting(0.2), VtpSetting(0.4))  # VTP shapes timed
    # head-equal channel removal: budgets (fewer attention MACs) on digits-vit and timed, the variants
    # run on digits-vit and the seeds each is averaged over
    head_channel_budgets: tuple[float, ...] = (0.3, 0.5)
    head_channel_variants: tuple[str, ...] = ("full", "l1")
    head_channel_seeds: int = 8  # seeds move the fine-tuned top-1 by ±0.4 pt; 8 resolve about ±0.15
    # token dropping: FLOPs ratios (pruned / dense) on digits-vit in each mode, the seeds each is averaged
    # over, and the static keep rates timed on the speed model
    token_drop_ratios: tuple[float, ...] = (0.65, 0.5)
    token_drop_modes: tuple[str, ...] = TOKEN_DROP_MODES
    token_drop_seeds: int = 3
    token_drop_speed: tuple[float, ...] = (0.7,)
    token_drop_finetune_epochs: int = 30  # digits-vit's own recipe after dropping (bench/token_drop.py)
    combined: CombinedSetting | None = COMBINED  # every landed method in one recipe (recipes/combined.yaml)
    # INT8 recipes from light to heavy, each trained stage by stage on digits-vit and timed in INT8
    combined_frontier: tuple[CombinedSetting, ...] = FRONTIER
    combined_schedule: StagedSchedule = COMBINED_SCHEDULE  # every combined recipe's digits-vit stages
    combined_seeds: int = 3  # seeds each combined recipe's digits-vit top-1 is averaged over
    # static INT8: digits-vit sparsities (0: dense; Fisher OBS masks) and the INT8 models timed
    int8_sparsities: tuple[float, ...] = (0.0, 0.75, 0.9)
    int8_speed: tuple[Int8SpeedSetting, ...] = INT8_SPEED
    # the formats every structured, token and combined speed row is also timed in as INT8 (QDQ on ONNX
    # Runtime and OpenVINO, the operator format on DeepSparse); the combined speed recipe is timed in these
    int8_formats: tuple[str, ...] = TWIN_FORMATS


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default",
        accuracy_sparsities=(0.5, 0.6, 0.7, 0.75, 0.8, 0.9),
        speed_settings=PATTERNS,
        batch_sizes=(1, 16),
        rounds=3,
        seconds_per_block=2.0,
        finetune_epochs=4,
        solver_timing_samples=64,  # full times the 128 the limit is about
    ),
    "full": Profile(
        "full",
        accuracy_sparsities=(0.5, 0.6, 0.7, 0.75, 0.8, 0.9),
        speed_settings=(SpeedSetting(0.5), SpeedSetting(0.75), *PATTERNS),
        batch_sizes=(1, 16),
        rounds=5,
        seconds_per_block=4.0,
        finetune_epochs=10,
        solver_timing_samples=128,
        # multiple 1: what rounding kept counts to 8 costs or buys in speed
        vtp_speed=(VtpSetting(0.2), VtpSetting(0.4), VtpSetting(0.4, multiple=1)),
        head_channel_variants=tuple(HEAD_CHANNEL_VARIANTS),  # the full method and every ablation
        token_drop_seeds=8,
        token_drop_speed=(0.5, 0.7),
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
