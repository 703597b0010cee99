"""Load and save plain state dicts (safetensors or weights-only torch pickles); never unpickle a module."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitsparse.runtime.atomic import atomic_path

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts commonly nest the weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
EMA_WRAPPER_KEYS = ("state_dict_ema", "model_ema")
# Key prefixes added by DataParallel/DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 8

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike, *, use_ema: bool = False) -> StateDict:
    """Read a state dict from ``.safetensors`` or ``.pth/.pt/.bin`` and strip common training wrappers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (expected a file ending in "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)})"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        raw = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(path)
    else:
        raise ValueError(
            f"unsupported checkpoint format {suffix!r} for {path}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    return _strip_prefixes(_unwrap(raw, path, use_ema=use_ema))


def _read_safetensors(path: Path) -> StateDict:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"could not read {path} as a safetensors file (corrupt or truncated?): {err}"
        ) from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused:
            raise ValueError(
                f"refusing to load {path}: it holds pickled Python objects, not only tensors (found "
                f"{refused.group(1)}; for example a whole nn.Module). Save `model.state_dict()` instead, "
                "ideally with vitsparse.models.save_state_dict()"
            ) from None
        raise ValueError(
            f"could not read {path} as a torch checkpoint (corrupt or not a checkpoint)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"could not read {path} as a torch checkpoint (corrupt or truncated?): {reason}"
        ) from None


def _unwrap(raw: object, path: Path, *, use_ema: bool) -> StateDict:
    """Descend through wrapper dicts such as ``{'state_dict': ...}`` until the values are tensors."""
    keys = EMA_WRAPPER_KEYS + WRAPPER_KEYS if use_ema else WRAPPER_KEYS
    state = raw
    while isinstance(state, Mapping) and not _all_tensors(state):
        inner = next((state[k] for k in keys if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} does not contain a state dict (found {type(state).__name__})")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path} is not a plain state dict: non-tensor entries {', '.join(bad[:_MAX_LISTED])}; "
            f"expected a mapping of parameter names to tensors, optionally under one of {WRAPPER_KEYS}"
        )
    return {str(k): v for k, v in state.items()}


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def _strip_prefixes(state: StateDict) -> StateDict:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, use_ema: bool = False
) -> nn.Module:
    """Load a local state dict into ``model`` in place and return it.

    For timm ViTs a state dict that does not already match is passed through timm's ``checkpoint_filter_fn``
    (resizes pos_embed / patch_embed, converts CLIP/DINOv2 layouts). Missing or unexpected keys (when
    ``strict``) and shape mismatches (always) are reported together in one ValueError.
    """
    state = read_state_dict(path, use_ema=use_ema)
    expected = model.state_dict()
    if isinstance(model, VisionTransformer) and not _matches(state, expected):
        state = checkpoint_filter_fn(state, model)
    problems = _compare(state, expected, strict=strict)
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(state, strict=strict)
    return model


def _matches(state: StateDict, expected: Mapping[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(state[k].shape == v.shape for k, v in expected.items())


def _compare(state: StateDict, expected: Mapping[str, torch.Tensor], *, strict: bool) -> list[str]:
    """Describe every key/shape disagreement between a checkpoint and a model's state dict."""
    problems = []
    if strict:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    return problems


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def save_state_dict(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a module's (or a mapping's) tensors to ``path`` as safetensors, atomically; returns the path."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(
            f"save_state_dict writes safetensors; expected a path ending in .safetensors, got {path}"
        )
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = _independent_tensors(state)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    return path


def _independent_tensors(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous CPU copies; tensors sharing storage are cloned because safetensors refuses shared memory."""
    out: StateDict = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot save {key!r}: expected a tensor, got {type(value).__name__}")
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out
