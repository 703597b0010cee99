"""The built-in ``digits-vit``: its config, the scikit-learn digits data it trains on, its architecture."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

# Bump when the cached weight format or the training code changes in a way that alters results.
FORMAT_VERSION = 1
DIGITS_MAX_PIXEL = 16.0  # sklearn digits pixels are integers in [0, 16]


@dataclass(frozen=True)
class DigitsViTConfig:
    """Architecture, data split and training recipe of ``digits-vit``; its hash keys the weight cache."""

    # architecture (timm VisionTransformer kwargs)
    img_size: int = 8
    patch_size: int = 2
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    # data: stratified split fractions and the split seed
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    # training
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    max_shift: int = 1  # random translation of up to this many pixels in each direction ...
    shift_prob: float = 0.5  # ... applied to this fraction of training images
    seed: int = 0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer``."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            class_token=True,
            global_pool="token",
        )

    def digest(self) -> str:
        """sha256 of the config (sorted JSON) and the cache format version."""
        payload = json.dumps({"format": FORMAT_VERSION, "config": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class DigitsDatasets:
    """Normalised digits splits as TensorDatasets of ``(N, 1, 8, 8)`` float images and int64 labels."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    mean: float  # of train pixels scaled to [0, 1]; apply ``(x / 16 - mean) / std`` to raw digits
    std: float

    def data_config(self) -> dict[str, Any]:
        """timm-style data config (input_size, mean, std) so other code can preprocess identically."""
        return {
            "input_size": (1, 8, 8),
            "mean": (self.mean,),
            "std": (self.std,),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        }


@dataclass(frozen=True)
class DigitsLoaders:
    """Train (shuffled with a seeded generator), val and test loaders over the digits splits."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    mean: float
    std: float


def digits_datasets(
    seed: int = 0, *, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> DigitsDatasets:
    """Split the 1797 digits images stratified into train/val/test and normalise by train mean/std."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) with sum < 1"
        )
    digits = load_digits()
    images = digits.images.astype(np.float32) / DIGITS_MAX_PIXEL
    labels = digits.target.astype(np.int64)
    train_idx, val_idx, test_idx = digits_split_rows(labels, seed, val_fraction, test_fraction)
    mean, std = float(images[train_idx].mean()), float(images[train_idx].std())

    def subset(rows: np.ndarray) -> TensorDataset:
        x = torch.from_numpy((images[rows] - mean) / std).unsqueeze(1)
        return TensorDataset(x, torch.from_numpy(labels[rows]))

    return DigitsDatasets(subset(train_idx), subset(val_idx), subset(test_idx), mean, std)


def digits_split_rows(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, val and test splits (stratified by label)."""
    idx = np.arange(len(labels))
    rest, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    val_share = val_fraction / (1.0 - test_fraction)
    train_idx, val_idx = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return train_idx, val_idx, test_idx


def write_digits_imagefolder(root: str | os.PathLike, per_class: int | None = None,
                             config: DigitsViTConfig | None = None) -> Path:
    """digits-vit's data as an image folder of 8x8 grey PNGs (pixels 0-16 scaled to 0-255): `train/` is
    its train split and `val/` its test split, the one prune-and-bench reports top-1 on. `per_class`
    keeps the first that many images of each class in each split (a small folder for tests)."""
    config = config or DigitsViTConfig()
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, _, test = digits_split_rows(labels, config.split_seed, config.val_fraction, config.test_fraction)
    root = Path(root)
    for split, rows in (("train", train), ("val", test)):
        for label in range(10):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            chosen = [row for row in rows if labels[row] == label][:per_class]
            for row in chosen:
                pixels = np.round(digits.images[row] * 255 / DIGITS_MAX_PIXEL).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{row}.png")
    return root


def digits_loaders(
    batch_size: int = 64, seed: int = 0, *, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> DigitsLoaders:
    """DataLoaders over :func:`digits_datasets`; train shuffles with a generator seeded by ``seed``."""
    data = digits_datasets(seed, val_fraction=val_fraction, test_fraction=test_fraction)
    generator = torch.Generator().manual_seed(seed)
    return DigitsLoaders(
        train=DataLoader(data.train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0),
        val=DataLoader(data.val, batch_size=batch_size, shuffle=False, num_workers=0),
        test=DataLoader(data.test, batch_size=batch_size, shuffle=False, num_workers=0),
        mean=data.mean,
        std=data.std,
    )


def digits_datasets_for(config: DigitsViTConfig) -> DigitsDatasets:
    """The splits a given config trains and evaluates on."""
    return digits_datasets(
        config.split_seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction
    )


def build_digits_architecture(
    config: DigitsViTConfig, data: DigitsDatasets | None = None
) -> VisionTransformer:
    """A randomly initialised ``digits-vit`` whose ``pretrained_cfg`` carries the digits normalisation."""
    data = data if data is not None else digits_datasets_for(config)
    model = VisionTransformer(**config.model_kwargs())
    model.pretrained_cfg = {
        "architecture": "digits-vit",
        "num_classes": config.num_classes,
        **data.data_config(),
        "input_size": (config.in_chans, config.img_size, config.img_size),
        "label_names": tuple(str(digit) for digit in range(config.num_classes)),
    }
    return model
