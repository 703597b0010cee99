"""Deterministic CPU training of ``digits-vit``: AdamW, warmup + cosine schedule, pixel-shift augmentation."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from .digits import (
    DigitsDatasets,
    DigitsLoaders,
    DigitsViTConfig,
    build_digits_architecture,
    digits_datasets_for,
)
from .evaluate import evaluate

CPU = torch.device("cpu")
DIGITS_SHAPE = (1, 8, 10)  # (in_chans, img_size, num_classes) of the scikit-learn digits


@dataclass(frozen=True)
class TrainMetrics:
    """What one training run achieved; stored next to the cached weights."""

    val_top1: float
    test_top1: float
    best_epoch: int  # 1-based epoch whose weights were kept (best val top-1, later epoch on ties)
    epochs: int
    train_seconds: float
    torch_version: str


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and enable deterministic algorithms; restores the global RNG and the previous setting."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def random_shift(
    images: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator, prob: float = 1.0
) -> torch.Tensor:
    """Translate each ``(N, C, H, W)`` image, with probability ``prob``, by a random whole-pixel offset in
    ``[-max_shift, max_shift]`` per axis, filling the uncovered border with ``fill``."""
    if max_shift <= 0 or prob <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=fill).permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    keep = torch.rand(n, generator=generator) >= prob
    dy, dx = torch.where(keep, max_shift, offsets)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    return shifted.permute(0, 3, 1, 2).contiguous()


def shifted_train_loader(loaders: DigitsLoaders, seed: int, config: DigitsViTConfig | None = None
                         ) -> DataLoader:
    """The digits train split, shuffled by `seed`, each batch shifted as digits-vit was trained
    (``max_shift``, ``shift_prob`` of `config`): a fine-tune that runs many epochs over 1257 images
    overfits without it."""
    config = config or DigitsViTConfig()
    background = (0.0 - loaders.mean) / loaders.std
    shifts = torch.Generator().manual_seed(seed + 1)

    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(batch)
        return random_shift(images, config.max_shift, background, shifts, config.shift_prob), labels

    return DataLoader(loaders.train.dataset, batch_size=loaders.train.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate)


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    augment: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for images, labels in loader:
        loss = loss_fn(model(augment(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / count


def _fit(
    model: VisionTransformer, data: DigitsDatasets, config: DigitsViTConfig, progress: bool
) -> tuple[float, int]:
    """Train ``model`` in place, leaving the best-val weights loaded; returns (best val top-1, epoch)."""
    shuffle = torch.Generator().manual_seed(config.seed)
    train = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=shuffle)
    val = DataLoader(data.val, batch_size=256)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * len(train)
    schedule = warmup_cosine(steps, config.warmup_epochs * len(train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    background = (0.0 - data.mean) / data.std

    def augment(x: torch.Tensor) -> torch.Tensor:
        return random_shift(x, config.max_shift, background, aug_gen, config.shift_prob)

    best_val, best_epoch, best_state = -1.0, 0, None
    bar = tqdm(
        range(1, config.epochs + 1), desc="digits-vit", unit="epoch", disable=None if progress else True
    )
    for epoch in bar:
        loss = _train_epoch(model, train, optimizer, scheduler, loss_fn, augment)
        val_top1 = evaluate(model, val, device=CPU).top1
        if val_top1 >= best_val:
            best_val, best_epoch, best_state = val_top1, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_top1:.3f}", best=f"{best_val:.3f}")
    model.load_state_dict(best_state)
    return best_val, best_epoch


def train_digits_vit(
    config: DigitsViTConfig | None = None, progress: bool = True
) -> tuple[VisionTransformer, TrainMetrics]:
    """Train ``digits-vit`` on the CPU, deterministically per config; keeps the best-val-epoch weights.

    Returns the model in eval mode and its metrics (val/test top-1, kept epoch, wall time).
    """
    config = config if config is not None else DigitsViTConfig()
    if (config.in_chans, config.img_size, config.num_classes) != DIGITS_SHAPE:
        raise ValueError(
            "digits images are 1-channel 8x8 with 10 classes; train_digits_vit needs in_chans=1, img_size=8, "
            f"num_classes=10, got {config.in_chans}, {config.img_size}, {config.num_classes}"
        )
    data = digits_datasets_for(config)
    start = time.perf_counter()
    with deterministic(config.seed):
        model = build_digits_architecture(config, data)
        best_val, best_epoch = _fit(model, data, config, progress)
        seconds = time.perf_counter() - start
        test_top1 = evaluate(model, DataLoader(data.test, batch_size=256), device=CPU).top1
    metrics = TrainMetrics(
        val_top1=best_val,
        test_top1=test_top1,
        best_epoch=best_epoch,
        epochs=config.epochs,
        train_seconds=round(seconds, 2),
        torch_version=torch.__version__,
    )
    return model.eval(), metrics
