"""Empirical-Fisher block OBS: the global second-order solver of WoodFisher / oViT / CAP ("obs-fisher").

The loss change of a weight perturbation δw is modelled as ½ δwᵀ F δw with F the empirical Fisher,
(1/m) Σ g gᵀ over m gradients g of the cross-entropy loss on calibration images. The full F is far
too large, so it is cut into blocks of B consecutive weights along a row of each layer's 2-D weight
view (correlations inside a block are kept, those between blocks dropped), damped and inverted:

    F_b = λ I + (1/m) Σ g_b g_bᵀ,   λ = damp · (mean of the layer's Fisher diagonal).

The damping is relative (as in OBC / SparseGPT and the "obs-layerwise" saliency), so the same
`damp` works whatever the scale of the gradients. F_b⁻¹ is built by Woodbury rank-1 updates as each
gradient arrives, batched over all blocks of a layer, so the gradients are never stored; the
damping needs the Fisher diagonal first, so the m gradients are computed twice (a first cheap pass
sums their squares per layer).

Inside each block, greedy OBS removes one unit (a weight, or a 1xK block of weights) at a time:
the unit G with the smallest loss ½ w_Gᵀ (F⁻¹_GG)⁻¹ w_G goes, the others are corrected by
δw = -F⁻¹_{:,G} (F⁻¹_GG)⁻¹ w_G and F⁻¹ is downdated. Each step's loss is recorded; the losses of a
block are made non-decreasing (cumulative max) and the lowest step losses over all blocks (of one
layer for scope "layer", of all target layers for scope "global") are removed, so each block loses
a prefix of its greedy order (correlation-aware allocation, as in CAP). The final weights follow from
the closed-form OBS update for each block's removed set P: w - F⁻¹_{:,P} (F⁻¹_PP)⁻¹ w_P.

Memory: the block inverses of all target layers are held at once, num_weights × B × 4 bytes
(float32); for deit_small_patch16_224 (21.2 M weights in qkv/proj/fc1/fc2) at B = 32 that is
2.7 GB, plus one layer's working copy during the greedy search. Lower `block_size` to need less
(memory is linear in B, the greedy search's time about quadratic). Measured at the defaults
(global 75 %, 128 calibration images of which 64 are used): 81 s and 4.6 GB peak RSS on 2 CPU
threads, 5 s and 3.9 GB peak CUDA memory on one H100.

Labels: the calibration labels when every batch has them, otherwise the model's own arg-max
predictions on each image (the gradient then measures how strongly the model holds its answer).
The first num_grads · grad_batch_size calibration images are used; fewer is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import Calibration
from .patterns import NOfM, weight_view
from .saliency import Masks, SaliencyRequest, register_saliency
from .solver_settings import check_counts, check_damp, check_device, resolve_device

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class FisherObsSettings:
    """Settings of the "obs-fisher" saliency (pass them as `SparsityPass(solver={...})`).

    `block_size` (B) weights, consecutive along a row, share one Fisher block: it must divide every
    target layer's input size and be a multiple of the pattern's unit (of M for N:M). `num_grads`
    (m) gradients, each over `grad_batch_size` calibration images, make the empirical Fisher.
    `damp` is the fraction of the layer's mean Fisher diagonal added to the diagonal. `device` runs
    the work there (None: CUDA when available, else the CPU); the model is moved back afterwards.
    """

    block_size: int = 32
    num_grads: int = 64
    grad_batch_size: int = 1
    damp: float = 1e-2
    device: str | None = None

    @property
    def calibration_images(self) -> int:
        """How many calibration images this solver reads: one batch per gradient."""
        return self.num_grads * self.grad_batch_size

    def __post_init__(self) -> None:
        check_counts("obs-fisher", self, ("block_size", "num_grads", "grad_batch_size"))
        check_damp("obs-fisher", self.damp, "Fisher")
        check_device("obs-fisher", self.device)


@dataclass
class GreedyResult:
    """Greedy OBS inside blocks: per step the loss and the unit removed (-1: block had none left).

    `losses` and `order` are (num_blocks, steps); `weights` are the blocks' weights after the steps.
    """

    losses: torch.Tensor
    order: torch.Tensor
    weights: torch.Tensor


# ---------------------------------------------------------------- block inverse Fisher (Woodbury)

def woodbury_update_(hinv: torch.Tensor, grad: torch.Tensor, num_grads: int) -> None:
    """In place: (F + g gᵀ / m)⁻¹ from F⁻¹ for every block; `hinv` (N, B, B), `grad` (N, B).

    Sherman-Morrison: F⁻¹ - F⁻¹ g gᵀ F⁻¹ / (m + gᵀ F⁻¹ g); F⁻¹ g is taken as gᵀ F⁻¹ (F⁻¹ is
    symmetric): a row-vector product, cheaper on the CPU than the column-vector one.
    """
    row = torch.bmm(grad.unsqueeze(1), hinv)  # (N, 1, B)
    denom = num_grads + (row * grad.unsqueeze(1)).sum(-1, keepdim=True)
    row = row / denom.sqrt()
    hinv.baddbmm_(row.transpose(1, 2), row, alpha=-1.0)


def _gradient_batches(calibration: Calibration | None, settings: FisherObsSettings) -> list[Batch]:
    """The first num_grads · grad_batch_size calibration images (and labels), cut per gradient."""
    need = settings.num_grads * settings.grad_batch_size
    have = 0 if calibration is None else calibration.num_samples
    if have < need:
        raise ValueError(f"obs-fisher needs num_grads × grad_batch_size = {settings.num_grads} × "
                         f"{settings.grad_batch_size} = {need} calibration images, got {have}; pass more "
                         f"images or lower num_grads / grad_batch_size")
    taken, seen = [], 0
    for batch in calibration:  # only the batches needed
        taken.append(batch)
        seen += batch[0].shape[0]
        if seen >= need:
            break
    images = torch.cat([x for x, _ in taken])[:need]
    labels = torch.cat([y for _, y in taken])[:need] if calibration.labelled() else None
    size = settings.grad_batch_size
    return [(images[i:i + size], None if labels is None else labels[i:i + size])
            for i in range(0, need, size)]


def _gradients(gm: nn.Module, weights: list[torch.Tensor], batches: list[Batch], device: torch.device,
               bar: tqdm) -> Iterator[list[torch.Tensor]]:
    """Cross-entropy gradients of `weights` (float32 2-D views), one list per batch; labels or arg-max."""
    with torch.enable_grad():
        for images, labels in batches:
            logits = gm(images.to(device))
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            target = logits.detach().argmax(-1) if labels is None else labels.to(device)
            loss = F.cross_entropy(logits.float(), target)
            grads = torch.autograd.grad(loss, weights)
            bar.update(1)
            yield [weight_view(g).float() for g in grads]


def block_inverse_fishers(gm: nn.Module, names: list[str], batches: list[Batch], settings: FisherObsSettings,
                          device: torch.device) -> dict[str, tuple[torch.Tensor, float]]:
    """Per layer: the damped block inverse Fishers of the normalised gradients, and the normalisation.

    With s the layer's mean Fisher diagonal, gradients are divided by √s so the blocks hold
    (damp·I + G/s)⁻¹ = s·(λI + G)⁻¹; OBS updates are unchanged by s, losses are multiplied by it.
    """
    weights = [gm.get_submodule(n).weight for n in names]
    block = settings.block_size
    with tqdm(total=2 * len(batches), desc="obs-fisher gradients", unit="grad", disable=None) as bar:
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        for grads in _gradients(gm, weights, batches, device, bar):
            sums += torch.stack([g.square().sum(dtype=torch.float64) for g in grads])
        means = (sums / (len(batches) * torch.tensor([w.numel() for w in weights], device=device))).tolist()
        fallback = sum(means) / len(means)
        if fallback <= 0:
            raise ValueError("obs-fisher: every calibration gradient of the target layers is zero, so the "
                             "Fisher holds no information; use other images (or labelled ones)")
        scales = [mean if mean > 0 else fallback for mean in means]
        hinvs = [torch.eye(block, device=device).repeat(w.numel() // block, 1, 1) / settings.damp
                 for w in weights]
        for grads in _gradients(gm, weights, batches, device, bar):
            for hinv, grad, scale in zip(hinvs, grads, scales, strict=True):
                woodbury_update_(hinv, grad.reshape(-1, block) / math.sqrt(scale), len(batches))
    return {n: (h, s) for n, h, s in zip(names, hinvs, scales, strict=True)}


# ---------------------------------------------------------------- greedy OBS inside blocks

def _unit_blocks(hinv: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, B, B) -> (N, U, K, K): the K×K diagonal blocks F⁻¹_GG of the U units of K weights."""
    n, b, _ = hinv.shape
    units = b // unit
    return hinv.view(n, units, unit, units, unit).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _unit_losses(weights: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(N, U) twice the OBS losses, w_Gᵀ (F⁻¹_GG)⁻¹ w_G, from the corners F⁻¹_GG (N, U, K, K).

    Numerical failures (a corner that is not positive definite) get the largest float, so they go last.
    """
    n, units, unit, _ = corners.shape
    big = torch.finfo(weights.dtype).max
    if unit == 1:
        diag = corners.view(n, units)
        return (weights.square() / diag.clamp_min(torch.finfo(weights.dtype).tiny)).clamp_max_(big)
    wu = weights.view(n, units, unit)
    solved, info = torch.linalg.solve_ex(corners, wu)
    loss = (wu * solved).sum(-1).masked_fill_(info != 0, big)
    return torch.nan_to_num(loss, nan=big, posinf=big, neginf=big).clamp_min_(0.0)


def _remove_units_(weights: torch.Tensor, hinv: torch.Tensor, corners: torch.Tensor, chosen: torch.Tensor,
                   active: torch.Tensor | None = None) -> None:
    """One OBS step in place per block: remove unit `chosen` (N,), correct w, downdate F⁻¹ and its corners.

    δw = -F⁻¹_{:,G} (F⁻¹_GG)⁻¹ w_G and F⁻¹ -= F⁻¹_{:,G} (F⁻¹_GG)⁻¹ F⁻¹_{G,:}. The corners F⁻¹_GG of
    all units (N, U, K, K) are downdated alongside (reading them off F⁻¹ each step is slow). Blocks
    where `active` is False are left unchanged.
    """
    n, units, unit, _ = corners.shape
    rows = torch.arange(n, device=weights.device).unsqueeze(1)
    idx = chosen.unsqueeze(1) * unit + torch.arange(unit, device=chosen.device)  # (N, K)
    rows_g = hinv[rows, idx]  # F⁻¹_{G,:}  (N, K, B); F⁻¹ is symmetric
    corner = corners[rows[:, 0], chosen]  # F⁻¹_GG  (N, K, K)
    corner_inv = 1.0 / corner if unit == 1 else torch.linalg.inv_ex(corner)[0]
    corner_inv = torch.nan_to_num(corner_inv, nan=0.0, posinf=0.0, neginf=0.0)
    if active is not None:
        corner_inv = corner_inv * active.view(n, 1, 1)
    scaled = rows_g * corner_inv if unit == 1 else corner_inv @ rows_g  # (F⁻¹_GG)⁻¹ F⁻¹_{G,:}
    w_g = weights.gather(1, idx)
    if unit == 1:
        weights.addcmul_(scaled[:, 0], w_g, value=-1.0)
    else:
        weights.sub_((w_g.unsqueeze(1) @ scaled).squeeze(1))
    hinv.baddbmm_(rows_g.transpose(1, 2), scaled, alpha=-1.0)
    if unit == 1:
        corners.view(n, units).addcmul_(rows_g[:, 0], scaled[:, 0], value=-1.0)
    else:  # corner of unit u -= (F⁻¹_{G,u})ᵀ [(F⁻¹_GG)⁻¹ F⁻¹_{G,:}]_{:,u}, one small product per unit
        left = rows_g.view(n, unit, units, unit).permute(0, 2, 3, 1).reshape(n * units, unit, unit)
        right = scaled.view(n, unit, units, unit).permute(0, 2, 1, 3).reshape(n * units, unit, unit)
        corners.view(n * units, unit, unit).baddbmm_(left, right, alpha=-1.0)
    weights.scatter_(1, idx, torch.where(active.unsqueeze(1), 0.0, w_g) if active is not None else 0.0)


def _eligible(removed: torch.Tensor, premasked: torch.Tensor, nofm: NOfM) -> torch.Tensor:
    """N:M: units not yet removed whose group still keeps more than N (or that were masked before)."""
    n, units = removed.shape
    kept = (~removed).view(n, units // nofm.m, nofm.m).sum(-1, keepdim=True) > nofm.n
    return ~removed & (kept.expand(-1, -1, nofm.m).reshape(n, units) | premasked)


def greedy_obs(weights: torch.Tensor, hinv: torch.Tensor, *, unit: int = 1,
               premasked: torch.Tensor | None = None, nofm: NOfM | None = None,
               max_steps: int | None = None) -> GreedyResult:
    """Greedy OBS in every block at once: weights (N, B), inverse Fishers (N, B, B), units of `unit`.

    Units holding a weight in `premasked` (N, B) go first (loss -inf). With `nofm` only weights of
    groups keeping more than N are eligible, so each group loses exactly M - N (or its masked ones).
    Runs `max_steps` steps (default: until no block has an eligible unit left).
    """
    dtype = torch.promote_types(weights.dtype, torch.float32)
    w, h = weights.to(dtype, copy=True), hinv.to(dtype, copy=True)
    n, b = w.shape
    units = b // unit
    corners = _unit_blocks(h, unit).clone()
    pre = torch.zeros(n, units, dtype=torch.bool, device=w.device) if premasked is None \
        else premasked.view(n, units, unit).any(-1)
    removed = torch.zeros_like(pre)
    penalty = torch.zeros(n, units, dtype=dtype, device=w.device).masked_fill_(pre, -math.inf)
    steps = units if max_steps is None else min(max_steps, units)
    losses = torch.full((n, steps), math.inf, dtype=dtype, device=w.device)
    order = torch.full((n, steps), -1, dtype=torch.long, device=w.device)
    rows, active = torch.arange(n, device=w.device), None
    for step in range(steps):
        score = _unit_losses(w, corners).add_(penalty)
        if nofm is not None:
            eligible = _eligible(removed, pre, nofm)
            active = eligible.any(-1)
            if not bool(active.any()):
                losses, order = losses[:, :step], order[:, :step]
                break
            score.masked_fill_(~eligible, math.inf)
        chosen = score.argmin(-1)
        losses[:, step] = score[rows, chosen]
        order[:, step] = chosen if active is None else torch.where(active, chosen, -1)
        _remove_units_(w, h, corners, chosen, active)
        hit, pick = (rows, chosen) if active is None else (rows[active], chosen[active])
        removed[hit, pick] = True
        penalty[hit, pick] = math.inf
    w.masked_fill_(removed.repeat_interleave(unit, dim=1), 0.0)
    return GreedyResult(losses.mul_(0.5), order, w)


def obs_closed_form(weights: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Weights (N, B) after removing the `pruned` (N, B) set of each block: w - F⁻¹_{:,P} (F⁻¹_PP)⁻¹ w_P.

    Solves with F⁻¹ restricted to P (identity elsewhere), so every block is one batched solve;
    the pruned weights are set exactly to 0.
    """
    dtype = torch.promote_types(weights.dtype, torch.float32)
    w, h = weights.to(dtype), hinv.to(dtype)
    both = pruned.unsqueeze(2) & pruned.unsqueeze(1)
    eye = torch.eye(w.shape[1], dtype=h.dtype, device=h.device)
    restricted = torch.where(both, h, eye.expand_as(h) * ~pruned.unsqueeze(2))
    x = torch.linalg.solve(restricted, (w * pruned).unsqueeze(-1))
    return (w - (h @ x).squeeze(-1)).masked_fill(pruned, 0.0)


# ---------------------------------------------------------------- allocation and the saliency

def _check_layers(request: SaliencyRequest, settings: FisherObsSettings) -> None:
    """ValueError naming the layer and the setting when the pattern or block size does not fit."""
    pattern, block = request.pattern, settings.block_size
    step = pattern.m if isinstance(pattern, NOfM) else pattern.unit
    if block % step:
        what = f"M = {step} of pattern {pattern.spec}" if isinstance(pattern, NOfM) \
            else f"the unit {step} of pattern {pattern.spec}"
        raise ValueError(f"obs-fisher block_size {block} must be a multiple of {what}; set "
                         f"solver={{'block_size': {max(step, block // step * step)}}}")
    for name in request.names:
        shape = tuple(weight_view(request.gm.get_submodule(name).weight).shape)
        pattern.check_shape(name, shape)
        if shape[1] % block:
            fits = [d for d in range(step, block + 1, step) if shape[1] % d == 0]
            raise ValueError(f"{name}: obs-fisher block_size {block} must divide the layer's input size "
                             f"{shape[1]} (weight view {shape}); set solver={{'block_size': {fits[-1]}}} "
                             f"or another divisor of {shape[1]} that is a multiple of {step}")


def _prune_counts(losses: dict[str, torch.Tensor], targets: dict[str, int]) -> dict[str, torch.Tensor]:
    """Units to remove per block: the lowest cumulative-max step losses, `targets` per group of layers.

    `targets` maps a layer name to its count (scope "layer") or "*" to one count for all layers.
    Ties break by position, so each block's chosen steps are a prefix of its greedy order.
    """
    steady = {n: torch.cummax(v, dim=1).values for n, v in losses.items()}
    groups = [[n] for n in steady] if "*" not in targets else [list(steady)]
    counts = {}
    for names in groups:
        flat = torch.cat([steady[n].flatten() for n in names])
        prune = max(targets.get("*", targets.get(names[0], 0)), int((flat == -math.inf).sum()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[torch.argsort(flat, stable=True)[:prune]] = True
        for n, piece in zip(names, chosen.split([steady[m].numel() for m in names]), strict=True):
            counts[n] = piece.view_as(steady[n]).sum(-1)
    return counts


def _unit_targets(request: SaliencyRequest, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """How many units to remove: per layer (scope "layer") or in total under the key "*" (global)."""
    pattern = request.pattern
    if request.scope == "layer":
        return {n: pattern.units_to_prune(s, request.sparsity) for n, s in shapes.items()}
    total = sum(s[0] * (s[1] // pattern.unit) for s in shapes.values())
    return {"*": round(request.sparsity * total)}


def _block_weights(module: nn.Module, block: int) -> torch.Tensor:
    """The weights the layer computes with (masked ones as 0), float32, as (num_blocks, B)."""
    weight = module.weight.detach()
    mask = getattr(module, "weight_mask", None)
    if mask is not None:
        weight = weight * mask
    return weight_view(weight).float().reshape(-1, block)


def _greedy_layers(request: SaliencyRequest, fishers: dict[str, tuple[torch.Tensor, float]],
                   block: int) -> dict[str, GreedyResult]:
    """Greedy OBS over every block of every target layer; losses scaled to true loss units."""
    pattern, results = request.pattern, {}
    nofm = pattern if isinstance(pattern, NOfM) else None
    for name in tqdm(request.names, desc="obs-fisher greedy", unit="layer", disable=None):
        module = request.gm.get_submodule(name)
        hinv, scale = fishers[name]
        mask = getattr(module, "weight_mask", None)
        premasked = None if mask is None else ~weight_view(mask).reshape(-1, block)
        result = greedy_obs(_block_weights(module, block), hinv, unit=pattern.unit, premasked=premasked,
                            nofm=nofm)
        results[name] = GreedyResult(result.losses * scale, result.order.to(torch.int32), torch.empty(0))
    return results


def _final_weights(request: SaliencyRequest, fishers: dict[str, tuple[torch.Tensor, float]],
                   greedy: dict[str, GreedyResult], counts: dict[str, torch.Tensor], block: int) -> Masks:
    """Apply the closed-form OBS update for each block's chosen prefix; write weights, return keep-masks."""
    unit, masks = request.pattern.unit, {}
    for name in request.names:
        module = request.gm.get_submodule(name)
        order = greedy[name].order.long()
        steps = torch.arange(order.shape[1], device=order.device)
        take = (steps < counts[name].unsqueeze(1)) & (order >= 0)
        pruned_units = torch.zeros(order.shape[0], block // unit, dtype=torch.bool, device=order.device)
        rows, steps_taken = take.nonzero(as_tuple=True)
        pruned_units[rows, order[rows, steps_taken]] = True
        pruned = pruned_units.repeat_interleave(unit, dim=1)
        new = obs_closed_form(_block_weights(module, block), fishers[name][0], pruned)
        with torch.no_grad():
            module.weight.copy_(new.view_as(module.weight).to(module.weight.dtype))
        masks[name] = ~pruned.view(module.weight.shape)
    return masks


def _solve(request: SaliencyRequest, settings: FisherObsSettings, device: torch.device) -> Masks:
    """The whole solver on a model already on `device` and in eval mode."""
    batches = _gradient_batches(request.calibration, settings)
    block = settings.block_size
    fishers = block_inverse_fishers(request.gm, request.names, batches, settings, device)
    greedy = _greedy_layers(request, fishers, block)
    if isinstance(request.pattern, NOfM):
        counts = {n: (g.order >= 0).sum(-1) for n, g in greedy.items()}
    else:
        shapes = {n: tuple(weight_view(request.gm.get_submodule(n).weight).shape) for n in request.names}
        counts = _prune_counts({n: g.losses for n, g in greedy.items()}, _unit_targets(request, shapes))
    return _final_weights(request, fishers, greedy, counts, block)


@register_saliency("obs-fisher", FisherObsSettings, needs_calibration=True)
def fisher_obs_masks(request: SaliencyRequest, settings: FisherObsSettings) -> Masks:
    """Empirical-Fisher block OBS: keep-masks per target layer; the kept weights get the OBS update.

    The model is moved to `settings.device` for the work and back afterwards, run in eval mode
    (train/eval modes restored) and its parameters' `.grad` are left untouched (gradients are taken
    with `torch.autograd.grad`).
    """
    if request.scope not in ("layer", "global"):
        raise ValueError(f"unknown scope {request.scope!r}; choose 'layer' or 'global'")
    if isinstance(request.pattern, NOfM) and request.scope != "layer":
        raise ValueError(f"pattern {request.pattern.spec} fixes the sparsity of every group; "
                         f"use scope 'layer'")
    _check_layers(request, settings)
    gm, device = request.gm, resolve_device("obs-fisher", settings.device)
    first = next(gm.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    modes = {m: m.training for m in gm.modules()}
    weights = [gm.get_submodule(n).weight for n in request.names]
    needs_grad = [w.requires_grad for w in weights]
    try:
        gm.to(device).eval()
        for w in weights:
            w.requires_grad_(True)
        masks = _solve(request, settings, device)
    finally:
        for w, flag in zip(weights, needs_grad, strict=True):
            w.requires_grad_(flag)
        gm.to(home)
        for module, training in modes.items():
            module.training = training
    return {n: m.to(home) for n, m in masks.items()}
