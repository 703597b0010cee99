"""Which layers a pruner touches, named by kind ("qkv", "fc1", "head", ...) and found from the structure."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vitsparse.compiler import ViTStructure

TargetFinder = Callable[[ViTStructure], list[str]]

TARGET_KINDS: dict[str, TargetFinder] = {
    "qkv": lambda s: [b.attn.qkv for b in s.blocks],
    "proj": lambda s: [b.attn.proj for b in s.blocks],
    "fc1": lambda s: [b.mlp.fc1 for b in s.blocks],
    "fc2": lambda s: [b.mlp.fc2 for b in s.blocks],
    "patch_embed": lambda s: [s.patch_embed],
    "head": lambda s: list(s.heads),
}
DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # embedding and head stay dense


def check_target_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """Validate a list of layer kinds; ValueError names any unknown or repeated kind."""
    if isinstance(kinds, str):
        raise ValueError(f"targets must be a list of layer kinds, got the string {kinds!r}")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"targets is empty; choose layer kinds from {sorted(TARGET_KINDS)}")
    unknown = [k for k in kinds if k not in TARGET_KINDS]
    if unknown:
        raise ValueError(f"unknown target layer kinds {unknown}; known kinds: {sorted(TARGET_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"targets lists a layer kind twice: {list(kinds)}")
    return kinds


def select_targets(structure: ViTStructure, kinds: Iterable[str]) -> list[str]:
    """Qualified module names of every layer of the given kinds, in graph order per kind."""
    names: list[str] = []
    for kind in check_target_kinds(kinds):
        names += [n for n in TARGET_KINDS[kind](structure) if n not in names]
    return names
