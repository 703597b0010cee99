"""ImageFolder data for real datasets, preprocessed the way the model expects (timm data config)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

IMAGE_MODES = {1: "L", 3: "RGB"}


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` the model really takes: its patch embedding, else its pretrained_cfg."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is not None and hasattr(proj, "in_channels"):
        return (proj.in_channels, *tuple(img_size))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config for ``model``, with input size and channel count taken from the model itself.

    (timm keeps the pretrained 224px size in ``pretrained_cfg`` even when built with another ``img_size``.)
    """
    input_size = model_input_size(model)
    cfg = resolve_data_config({"input_size": input_size}, model=model)
    chans = input_size[0]
    for key in ("mean", "std"):
        values = tuple(cfg[key])
        if len(values) != chans:  # e.g. a 1-channel model with RGB statistics: use their average
            cfg[key] = (sum(values) / len(values),) * chans
    return cfg


def sync_pretrained_cfg(model: nn.Module) -> None:
    """Make ``model.pretrained_cfg`` describe the input the model really takes, for downstream consumers."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    data_cfg = model_data_config(model)
    cfg.update(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"],
               interpolation=data_cfg["interpolation"], crop_pct=data_cfg["crop_pct"],
               crop_mode=data_cfg.get("crop_mode", "center"))
    labels = class_label_names(model)
    if labels is not None:
        cfg["label_names"] = labels
    model.pretrained_cfg = cfg


def class_label_names(model: nn.Module) -> tuple[str, ...] | None:
    """One readable name per output class: the cfg's own, else ImageNet's for a 1000/21k-class timm head.

    None when the names are unknown or their count differs from the head's (a replaced classifier).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", None)
    names = cfg.get("label_names")
    if names is None:
        subset = infer_imagenet_subset(model) if num_classes else None
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        names = [info.index_to_description(index).split(",")[0] for index in range(info.num_classes())]
    names = tuple(str(name) for name in names)
    return names if len(names) == num_classes else None


def imagefolder_loader(
    root: str | os.PathLike,
    model: nn.Module,
    *,
    batch_size: int = 64,
    train: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``root/<class>/<image>`` with the model's timm preprocessing (training augmentation
    and shuffling when ``train``)."""
    root = _check_root(root)
    cfg = model_data_config(model)
    chans = cfg["input_size"][0]
    if chans not in IMAGE_MODES:
        raise ValueError(f"imagefolder_loader supports 1- or 3-channel models, got {chans} input channels")
    mode = IMAGE_MODES[chans]
    transform = create_transform(**cfg, is_training=train)
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=partial(_open_image, mode=mode))
    except FileNotFoundError as err:
        raise ValueError(f"no usable images under {root}: {err}") from None
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=num_workers)


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"image folder not found: {root} (expected {root}/<class_name>/<image files>)"
        )
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected {root}/<class_name>/<image files>)")
    if not any(child.is_dir() and not child.name.startswith(".") for child in root.iterdir()):
        raise ValueError(f"{root} has no class folders (expected {root}/<class_name>/<image files>)")
    return root


def _open_image(path: str, mode: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert(mode)
