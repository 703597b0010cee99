"""Every method prune-and-bench knows, by the name its settings are written with (`vtp=0.4`).

A new method is its own module with a `MethodSpec` and one line here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import combined, head_channels, int8, masks, token_drop, vtp
from .spec import MethodSpec

SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add `spec` under its name (a name taken twice is a mistake, not an override)."""
    if spec.name in SPECS:
        raise ValueError(f"a method named {spec.name!r} is registered already")
    SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> MethodSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(SPECS)}") from None


@contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """`spec` registered for the duration of a `with` block (tests register doubles this way)."""
    register(spec)
    try:
        yield spec
    finally:
        del SPECS[spec.name]


register(masks.MAGNITUDE)
register(masks.OBS_LAYERWISE)
register(masks.OBS_FISHER)
register(vtp.SPEC)
register(head_channels.SPEC)
register(token_drop.SPEC)
register(int8.SPEC)
register(combined.SPEC)
