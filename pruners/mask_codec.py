"""Masks in a recipe: each boolean mask as base64 of zlib-compressed numpy.packbits.

A mask costs at most one bit per weight (deit_small: 21 M weights, < 3.6 MB of base64 JSON; less
at high sparsity, where zlib finds the runs), so a replay rebuilds the masks without weights.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from vitsparse.compiler import RecipeError

ENCODING = "packbits-zlib-base64"


def encode_mask(mask: torch.Tensor) -> str:
    bits = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1))
    return base64.b64encode(zlib.compress(bits.tobytes(), 6)).decode("ascii")


def decode_mask(text: str, shape: list[int] | tuple[int, ...], name: str) -> torch.Tensor:
    """Inverse of `encode_mask`; RecipeError names the layer when the data is corrupt."""
    numel = math.prod(shape)
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError, AttributeError) as err:
        raise RecipeError(f"mask of {name!r} in the recipe is corrupt: {err}") from None
    if len(raw) != (numel + 7) // 8:
        raise RecipeError(f"mask of {name!r} holds {len(raw)} bytes, shape {list(shape)} needs "
                          f"{(numel + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=numel).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def layer_decisions(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per masked layer: shape, pruned and non-zero counts, sparsity, and the encoded mask."""
    layers, pruned_total, numel_total = {}, 0, 0
    for name in masks:
        module = model.get_submodule(name)
        mask = module.weight_mask
        pruned = int(mask.numel() - mask.sum())
        layers[name] = {"shape": list(mask.shape), "numel": mask.numel(), "pruned": pruned,
                        "nonzero": int(module.weight.count_nonzero()),
                        "sparsity": round(pruned / mask.numel(), 6), "mask": encode_mask(mask)}
        pruned_total, numel_total = pruned_total + pruned, numel_total + mask.numel()
    sparsity = round(pruned_total / numel_total, 6) if numel_total else 0.0
    return {"encoding": ENCODING, "sparsity": sparsity, "layers": layers}


def masks_from_decisions(decisions: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The masks a record stores, by layer name."""
    if decisions.get("encoding") != ENCODING or not isinstance(decisions.get("layers"), dict):
        raise RecipeError(f"mask record needs 'encoding': {ENCODING!r} and a 'layers' object, got "
                          f"encoding {decisions.get('encoding')!r}")
    masks = {}
    for name, layer in decisions["layers"].items():
        if not isinstance(layer, dict) or "mask" not in layer or "shape" not in layer:
            raise RecipeError(f"mask record of {name!r} needs 'shape' and 'mask'")
        masks[name] = decode_mask(layer["mask"], layer["shape"], name)
    return masks


def record_masks(record: Any, field: str, shape_key: str) -> dict[str, torch.Tensor]:
    """The boolean masks a pass record keeps as decisions[field] = {key: {shape_key: shape or size,
    "mask": encoded}}; RecipeError names what is missing."""
    entries = record.decisions.get(field)
    if not isinstance(entries, dict):
        raise RecipeError(f"{record.name} record needs decisions.{field}")
    masks = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or shape_key not in entry or "mask" not in entry:
            raise RecipeError(f"{record.name} record of {key!r} needs '{shape_key}' and 'mask'")
        shape = entry[shape_key]
        masks[key] = decode_mask(entry["mask"], [shape] if isinstance(shape, int) else shape, key)
    return masks
