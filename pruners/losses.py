"""Training losses shared by the pruners: label-smoothed cross-entropy, optionally distilled."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logits_of(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """The class logits of a model output (distilled ViTs may return a tuple; take its first entry)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    ce = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kl
