"""Top-1/top-5 accuracy of any module that maps an image batch to logits (nn.Module or fx GraphModule)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class EvalResult:
    """Accuracy as fractions in [0, 1]; ``top5`` is None when the model has 5 classes or fewer."""

    top1: float
    top5: float | None
    num_samples: int


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Accuracy of ``model`` over ``(images, labels)`` batches, in eval mode under ``torch.inference_mode``.

    It runs on ``device`` (default: CUDA if available); the model's device and train/eval mode are restored
    afterwards, so evaluating on a GPU never leaves a CPU model (bound for export) on the GPU.
    """
    device = torch.device(device) if device is not None else default_device()
    was_training = model.training
    home = next(model.parameters(), torch.empty(0)).device
    model.to(device).eval()
    correct1 = correct5 = seen = 0
    num_classes = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="evaluate", unit="batch", disable=None if progress else True):
                images, labels = _split_batch(batch)
                logits = model(images.to(device))
                if isinstance(logits, (tuple, list)):  # e.g. distilled ViTs in train mode; eval returns one
                    logits = logits[0]
                labels = labels.to(logits.device)
                num_classes = logits.shape[-1]
                topk = logits.topk(min(5, num_classes), dim=-1).indices
                hits = topk == labels[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=-1).sum())
                seen += len(labels)
    finally:
        model.train(was_training)
        model.to(home)
    if seen == 0:
        raise ValueError("evaluate() got an empty loader; expected at least one (images, labels) batch")
    top5 = correct5 / seen if num_classes > 5 else None
    return EvalResult(top1=correct1 / seen, top5=top5, num_samples=seen)


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"evaluate() expects batches of (images, labels); got {type(batch).__name__}")
