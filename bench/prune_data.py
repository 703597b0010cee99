"""The user's image folder for `vitsparse prune`: `DATA/train/<class>/` and `DATA/val/<class>/`.

Files are listed as `vitsparse eval` lists them (`runtime.evaluate.image_folder`: JPEG/PNG, folders
named after the model's labels map to those labels, else sorted order), so training, evaluation and
serving agree on what class an image is. Preprocessing is timm's data config for the model; the
training loaders draw their order and augmentation from the seed and epoch alone, so a resumed run
sees what an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from vitsparse.models import DigitsViTConfig
from vitsparse.models.data import IMAGE_MODES
from vitsparse.models.train import random_shift
from vitsparse.runtime.errors import RuntimeInputError
from vitsparse.runtime.evaluate import image_folder

Items = list[tuple[Path, int]]
SPLITS = ("train", "val")


@dataclass
class ImageData:
    """The listed images of both splits, the class names, and the files skipped as undecodable."""

    root: Path
    classes: tuple[str, ...]
    train: Items
    val: Items
    skipped: list[str] = field(default_factory=list)


def check_image_data(root: str | os.PathLike, labels: tuple[str, ...] | None = None) -> ImageData:
    """List `root/train` and `root/val`; ValueError for a missing split, an empty class folder, or
    splits with different classes. Files whose header no image reader accepts are skipped and counted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"data folder not found: {root} (expected {root}/train/<class>/ and {root}/val/<class>/)"
        )
    listed, classes = {}, {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise ValueError(
                f"{root} has no {split}/ folder: lay the data out as {root}/train/<class>/<image> "
                f"and {root}/val/<class>/<image>"
            )
        try:
            listed[split] = image_folder(folder, labels)
        except RuntimeInputError as err:
            raise ValueError(str(err)) from None
        classes[split] = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise ValueError(
            f"{root}: train/ and val/ hold different classes (in one only: {', '.join(only[:8])})"
        )
    skipped: list[str] = []
    for split in SPLITS:
        listed[split] = [(path, label) for path, label in listed[split] if _readable(path, skipped)]
    return ImageData(root, tuple(classes["train"]), listed["train"], listed["val"], skipped)


def _readable(path: Path, skipped: list[str]) -> bool:
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        skipped.append(str(path))
        return False


class ImageList(Dataset):
    """(image, label) pairs through a transform; a file that fails to decode names itself."""

    def __init__(self, items: Items, transform: Callable, mode: str) -> None:
        self.items, self.transform, self.mode = items, transform, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert(self.mode)), label
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot decode {path}: {err}") from None


class EpochSampler(Sampler[int]):
    """A shuffled order that depends on the seed, the stream and the epoch alone (`set_epoch`, as
    DistributedSampler): each training call draws its own stream, so calls do not repeat one order."""

    def __init__(self, size: int, seed: int, stream: int = 0) -> None:
        self.size, self.seed, self.stream, self.epoch = size, seed, stream, 0
        self.shifts = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        key = ((self.seed * 1_000_003 + self.stream) * 10_007 + self.epoch) % (2**62)
        generator = torch.Generator().manual_seed(key)
        self.shifts.manual_seed(key + 1)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class PruneLoaders:
    """What the stages train and are measured on."""

    train: Callable[[str, int], DataLoader]  # (augmentation "timm" | "shift" | "none", stream) -> loader
    val: DataLoader
    calibration: torch.Tensor


def make_loaders(
    data: ImageData, cfg: dict, batch_size: int, seed: int, calibration_images: int
) -> PruneLoaders:
    """Loaders with the model's timm data config `cfg` (timm's training augmentation for "timm")."""
    chans = cfg["input_size"][0]
    if chans not in IMAGE_MODES:
        raise ValueError(f"vitsparse prune reads 1- or 3-channel images; the model takes {chans} channels")
    mode = IMAGE_MODES[chans]
    plain = ImageList(data.train, create_transform(**cfg, is_training=False), mode)
    augmented = ImageList(data.train, create_transform(**cfg, is_training=True), mode)

    def train(augment: str, stream: int = 0) -> DataLoader:
        sampler = EpochSampler(len(data.train), seed, stream)
        collate = _shifting(sampler, cfg) if augment == "shift" else default_collate
        return DataLoader(
            augmented if augment == "timm" else plain,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
        )

    val = DataLoader(
        ImageList(data.val, create_transform(**cfg, is_training=False), mode), batch_size=batch_size
    )
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed))
    count = min(calibration_images, len(plain))
    calibration = torch.stack([plain[int(i)][0] for i in order[:count]])
    return PruneLoaders(train, val, calibration)


def _shifting(sampler: EpochSampler, cfg: dict) -> Callable:
    """Collate, then shift each image by whole pixels as digits-vit was trained (border: black)."""
    digits = DigitsViTConfig()
    fill = (0.0 - cfg["mean"][0]) / cfg["std"][0]

    def collate(batch: list):
        images, labels = default_collate(batch)
        return random_shift(images, digits.max_shift, fill, sampler.shifts, digits.shift_prob), labels

    return collate
