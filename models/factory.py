"""``build_model``: one entry point for the built-in models and every timm VisionTransformer variant."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .data import sync_pretrained_cfg
from .digits import DigitsViTConfig, build_digits_architecture
from .pretrained import digits_vit
from .weights import load_checkpoint

Builder = Callable[..., nn.Module]
_BUILTINS: dict[str, Builder] = {}
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def register_builtin(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(*, pretrained: bool, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(builder: Builder) -> Builder:
        if name in _BUILTINS:
            raise ValueError(f"a built-in model named {name!r} is already registered")
        _BUILTINS[name] = builder
        return builder

    return decorator


def list_builtin_models() -> list[str]:
    """Names of the built-in models (usable with :func:`build_model` next to all timm ViT names)."""
    return sorted(_BUILTINS)


@register_builtin("digits-vit")
def _build_digits_vit(
    *,
    pretrained: bool,
    config: DigitsViTConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides: Any,
) -> nn.Module:
    """digits-vit; ``pretrained`` = locally trained, cached weights; extra kwargs override config fields."""
    config = config if config is not None else DigitsViTConfig()
    fields = {f.name for f in dataclasses.fields(DigitsViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"digits-vit got unknown arguments {unknown}; it takes config=, cache_dir=, progress= and "
            f"DigitsViTConfig fields: {sorted(fields)}"
        )
    config = dataclasses.replace(config, **overrides)
    if pretrained:
        return digits_vit(config, cache_dir=cache_dir, progress=progress)
    return build_digits_architecture(config)


def build_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a built-in model or any timm VisionTransformer variant, in eval mode.

    ``pretrained`` fetches timm's weights (or digits-vit's cached ones); ``checkpoint`` loads a local state
    dict afterwards and, since it replaces every weight, skips fetching the pretrained ones.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    fetch = pretrained and checkpoint is None
    if name in _BUILTINS:
        model = _BUILTINS[name](pretrained=fetch, **timm_kwargs)
    else:
        model = _build_timm(name, fetch, timm_kwargs)
    _require_vit(name, model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    sync_pretrained_cfg(model)
    return model.eval()


def _build_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if not (timm.is_model(name) or name.startswith(_HUB_PREFIXES)):
        raise ValueError(_unknown_name_message(name))
    check_text_arguments(VisionTransformer, kwargs)
    if pretrained:  # find out the class on the meta device before downloading any weights
        _require_vit(name, _try_build_on_meta(name, kwargs))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as err:
        raise ValueError(f"timm could not build {name!r} with arguments {kwargs}: {err}") from None


TEXT_TYPES = ("str", "Callable", "Type", "Any")  # annotations a text value may satisfy


def check_text_arguments(cls: type, kwargs: dict[str, Any]) -> None:
    """ValueError for a text value where `cls`'s constructor takes no text (timm reads `class_token='no'`
    as true), or one outside a Literal's choices; the key is named."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: nothing to check against
        return
    for key, value in kwargs.items():
        hint = hints.get(key)
        if not isinstance(value, str) or hint is None:
            continue
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if choices is not None and value not in choices:
            raise ValueError(f"{key}={value!r}: {cls.__name__} takes one of {', '.join(map(repr, choices))}")
        if choices is None and not any(word in str(hint) for word in TEXT_TYPES):
            raise ValueError(f"{key}={value!r}: {cls.__name__} takes {_type_name(hint)} for {key}, not text "
                             "(write a number, true/false/none, or a tuple such as (224, 224))")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _try_build_on_meta(name: str, kwargs: dict[str, Any]) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # the real build afterwards reports any problem properly
        return None


def _require_vit(name: str, model: nn.Module | None) -> None:
    if model is not None and not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{name!r} builds a {type(model).__module__}.{type(model).__qualname__}, not a "
            "timm.models.vision_transformer.VisionTransformer (or subclass); vitsparse prunes ViTs only"
        )


def _unknown_name_message(name: str) -> str:
    candidates = list_builtin_models() + timm.list_models()
    by_stem: dict[str, list[str]] = {}  # "deit_tiny" -> its full names, so a short typo still matches
    for candidate in candidates:
        by_stem.setdefault(candidate.split("_patch")[0], []).append(candidate)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    for stem in reversed(difflib.get_close_matches(name, list(by_stem), n=2, cutoff=0.8)):
        close = by_stem[stem][:3] + [c for c in close if c not in by_stem[stem]]
    close = close[:5]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown model {name!r}: not a built-in ({', '.join(list_builtin_models())}) "
        f"nor a timm model name{hint}"
    )
