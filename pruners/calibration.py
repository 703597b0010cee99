"""Calibration data for data-aware pruners: a fixed list of image batches, labels where known.

Accepts what users have at hand: an image tensor (N, C, H, W), a DataLoader or any iterable of
image tensors or (images, labels) pairs. Labels are optional; a solver that needs them (the
empirical Fisher) falls back to the model's own predictions and says so in its docs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Calibration:
    """Image batches (and labels, or None) holding `num_samples` images in total."""

    batches: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]

    @property
    def num_samples(self) -> int:
        return sum(images.shape[0] for images, _ in self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return iter(self.batches)

    def images(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All images again, re-cut into batches of at most `batch_size`."""
        yield from torch.cat([images for images, _ in self.batches]).split(batch_size)

    def labelled(self) -> bool:
        return all(labels is not None for _, labels in self.batches)


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if labels is not None and labels.shape[:1] != batch[0].shape[:1]:
            raise ValueError(f"calibration batch has {batch[0].shape[0]} images but labels of shape "
                             f"{tuple(labels.shape)}")
        return batch[0], labels
    raise ValueError(f"calibration batches must be image tensors or (images, labels) pairs, got "
                     f"{type(batch).__name__}")


def make_calibration(data: Calibration | torch.Tensor | Iterable, max_samples: int | None = None
                     ) -> Calibration:
    """Gather up to `max_samples` images from `data`; ValueError when there are none or they are bad."""
    if isinstance(data, Calibration) and max_samples is None:
        batches = data.batches
    else:
        if isinstance(data, torch.Tensor):
            data = data.split(64)
        if not isinstance(data, Iterable):
            raise ValueError(f"calibration data must be a tensor, a DataLoader or an iterable of "
                             f"batches, got {type(data).__name__}")
        batches, seen = [], 0
        for batch in data:
            images, labels = _split_batch(batch)
            if max_samples is not None:
                images = images[: max_samples - seen]
                labels = labels[: images.shape[0]] if labels is not None else None
            if images.ndim != 4:
                raise ValueError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
            if images.shape[0]:
                batches.append((images, labels))
                seen += images.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
        batches = tuple(batches)
    calibration = Calibration(tuple(batches))
    if calibration.num_samples == 0:
        raise ValueError("calibration data holds no images; calibration needs at least one")
    return calibration
