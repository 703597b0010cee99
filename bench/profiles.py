"""What each prune-and-bench profile runs: `default` (≤ 15 min on 2 cores) and `full` (≤ 1 h)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    accuracy_sparsities: tuple[float, ...]  # magnitude settings trained and evaluated on digits-vit
    speed_sparsities: tuple[float, ...]  # magnitude settings timed on the speed model
    batch_sizes: tuple[int, ...]
    rounds: int  # alternating timing rounds per batch size
    seconds_per_block: float  # consecutive calls per runner per round
    finetune_epochs: int


PROFILES: dict[str, Profile] = {
    "default": Profile(
        "default",
        accuracy_sparsities=(0.5, 0.75, 0.9),
        speed_sparsities=(0.9,),
        batch_sizes=(1, 16),
        rounds=4,
        seconds_per_block=3.0,
        finetune_epochs=4,
    ),
    "full": Profile(
        "full",
        accuracy_sparsities=(0.5, 0.75, 0.9),
        speed_sparsities=(0.5, 0.75, 0.9),
        batch_sizes=(1, 16),
        rounds=5,
        seconds_per_block=4.0,
        finetune_epochs=10,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
