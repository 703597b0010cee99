"""One fine-tune loop for every pruner: AdamW, warmup + cosine, optional distillation, masks kept at zero.

Runs on CUDA when present (bf16/fp16 autocast, GradScaler for fp16) and on the CPU otherwise; under
`torchrun` it trains with DistributedDataParallel, one shard of the data per rank, and evaluates
on rank 0. Works on a traced GraphModule as well as on a plain nn.Module.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vitsparse.models import EvalResult, evaluate
from vitsparse.models.train import warmup_cosine

from . import distributed as dist_utils
from .checkpoints import active_store, epoch_seed
from .losses import distillation_loss, logits_of
from .masked import apply_masks_, mask_digest

AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NO_DECAY_NAMES = ("cls_token", "dist_token", "reg_token", "pos_embed")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune settings; the batch size is the train loader's. `max_steps` cuts training short.

    Distillation (`distill_alpha` weight of the KL term at `distill_temperature`) applies when a
    teacher is given. `amp` enables mixed precision on CUDA (`amp_dtype`: bf16 where supported).
    """

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    label_smoothing: float = 0.1
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    amp: bool = True
    amp_dtype: str | None = None
    grad_clip: float | None = None
    device: str | None = None
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.distill_alpha <= 1, f"distill_alpha must lie in [0, 1], got {self.distill_alpha}"),
            (self.distill_temperature > 0,
             f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (self.amp_dtype is None or self.amp_dtype in AMP_DTYPES,
             f"amp_dtype must be one of {sorted(AMP_DTYPES)} or None, got {self.amp_dtype!r}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("bad FinetuneConfig: " + "; ".join(problems))


@dataclass
class FinetuneResult:
    """The fine-tuned model (same object, in eval mode) and its validation accuracy (rank 0 only)."""

    model: nn.Module
    val: EvalResult | None
    steps: int
    seconds: float
    train_loss: float
    world_size: int = 1
    rank: int = 0
    device: str = "cpu"  # where it trained


@dataclass
class _Trainer:
    """What one optimisation step needs."""

    model: nn.Module  # possibly DDP-wrapped
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    config: FinetuneConfig
    hooks: TrainHooks
    rank: int = 0


@dataclass(frozen=True)
class TrainHooks:
    """What a pruner adds to the shared loop: `regularizer()` is added to every step's loss (e.g. an L1
    penalty on its scores); `before_step(step, total)` runs before each step's forward (e.g. to update
    masks that follow a ramped budget)."""

    regularizer: Callable[[], torch.Tensor] | None = None
    before_step: Callable[[int, int], None] | None = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms (1-D tensors), tokens and position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or name.endswith(NO_DECAY_NAMES)
            (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def amp_dtype_for(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype on CUDA (None: full precision, always the case on the CPU)."""
    if device.type != "cuda" or not config.amp:
        return None
    if config.amp_dtype is not None:
        return AMP_DTYPES[config.amp_dtype]
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _total_steps(loader: Iterable, config: FinetuneConfig) -> int:
    total = config.epochs * len(loader)
    if total == 0:
        raise ValueError("finetune() got an empty train loader")
    return min(total, config.max_steps) if config.max_steps is not None else total


def _make_trainer(model: nn.Module, teacher: nn.Module | None, config: FinetuneConfig, device: torch.device,
                  total_steps: int, hooks: TrainHooks) -> _Trainer:
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, config.warmup_steps))
    dtype = amp_dtype_for(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    if teacher is not None and config.distill_alpha > 0:
        teacher = teacher.to(device).eval()
    else:
        teacher = None
    return _Trainer(model, teacher, optimizer, scheduler, scaler, dtype, device, config, hooks)


def _autocast(trainer: _Trainer) -> contextlib.AbstractContextManager:
    if trainer.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(trainer.device.type, dtype=trainer.amp_dtype)


def _step(trainer: _Trainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """One optimiser step, then masks re-applied so pruned weights stay exactly zero; (loss, images the
    model classified right)."""
    config = trainer.config
    images = images.to(trainer.device, non_blocking=True)
    labels = labels.to(trainer.device, non_blocking=True)
    with _autocast(trainer):
        student = logits_of(trainer.model(images))
        teacher = None
        if trainer.teacher is not None:
            with torch.no_grad():
                teacher = logits_of(trainer.teacher(images))
    alpha = config.distill_alpha if teacher is not None else 0.0
    loss = distillation_loss(student, teacher, labels, alpha=alpha, temperature=config.distill_temperature,
                             label_smoothing=config.label_smoothing)
    if trainer.hooks.regularizer is not None:
        loss = loss + trainer.hooks.regularizer()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    if config.grad_clip is not None:
        trainer.scaler.unscale_(trainer.optimizer)
        nn.utils.clip_grad_norm_(trainer.model.parameters(), config.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    apply_masks_(trainer.model)
    return float(loss.detach()), int((student.detach().argmax(-1) == labels).sum())


def _train(trainer: _Trainer, loader: DataLoader, total_steps: int, show: bool) -> tuple[int, float]:
    """Run epochs until `total_steps`; returns (steps, mean loss).

    Inside `resumable(store)`, each epoch is reseeded from the seed and its number, its end saved to the
    store, and a call the store has state for starts after the epoch it last finished.
    """
    trainer.model.train()
    store = active_store()
    call = store.next_call() if store is not None else None
    first_epoch = _restore(trainer, store.load(call)) if store is not None else 0
    steps, loss_sum = first_epoch * len(loader), 0.0
    epochs = math.ceil(total_steps / len(loader))
    bar = tqdm(total=total_steps, initial=steps, desc="train", unit="step", disable=None if show else True)
    with bar:
        for epoch in range(first_epoch, epochs):
            started, epoch_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            if store is not None:
                _reseed(epoch_seed(trainer.config.seed + trainer.rank, epoch, call))
            for images, labels in loader:
                if trainer.hooks.before_step is not None:
                    trainer.hooks.before_step(steps, total_steps)
                loss, hits = _step(trainer, images, labels)
                steps, loss_sum, epoch_loss = steps + 1, loss_sum + loss, epoch_loss + loss * len(labels)
                correct, seen = correct + hits, seen + len(labels)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss:.4f}",
                                top1=f"{correct / seen:.1%}")
                if steps >= total_steps:
                    break
            if store is not None:
                _checkpoint(trainer, store, call, epoch, epochs, epoch_loss / max(seen, 1),
                            correct / max(seen, 1), time.perf_counter() - started)
            if steps >= total_steps:
                break
    done = steps - first_epoch * len(loader)
    return steps, loss_sum / max(done, 1)


def _restore(trainer: _Trainer, state: dict | None) -> int:
    """Load a saved epoch's model, optimiser, schedule and scaler; the epoch to start from."""
    if state is None:
        return 0
    _unwrapped(trainer.model).load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def _checkpoint(trainer: _Trainer, store, call: int, epoch: int, epochs: int, loss: float, top1: float,
                seconds: float) -> None:
    state = {"epoch": epoch, "model": _unwrapped(trainer.model).state_dict(),
             "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
             "scaler": trainer.scaler.state_dict()}
    store.save(call, state)
    if store.on_epoch is not None:
        store.on_epoch({"call": call, "epoch": epoch + 1, "epochs": epochs, "loss": round(loss, 5),
                        "train_top1": round(top1, 5), "seconds": round(seconds, 2)})


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _seeded(seed: int, device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the RNGs (the caller's stay untouched) and seed them."""
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    state = random.getstate()  # timm's augmentations draw from Python's RNG
    stack.callback(random.setstate, state)
    torch.manual_seed(seed)
    return stack


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def finetune(model: nn.Module, train_loader: DataLoader, val_loader: Iterable | None = None,
             config: FinetuneConfig | None = None, teacher: nn.Module | None = None,
             progress: bool = True, regularizer: Callable[[], torch.Tensor] | None = None,
             before_step: Callable[[int, int], None] | None = None) -> FinetuneResult:
    """Fine-tune `model` in place (DDP under torchrun) keeping its masks, then evaluate on `val_loader`.

    Training runs on the GPU when there is one; the model (and teacher) go back to the device they
    came on, so the caller's next step (evaluate, export) finds them where it left them. With a
    `teacher`, the loss mixes label CE with KL to the teacher's softened logits; `regularizer()`, when
    given, is added to every step's loss (e.g. VTP's λ·‖â‖₁ over the model's own parameters) and
    `before_step(step, total_steps)` runs before every step (see TrainHooks).
    """
    hooks = TrainHooks(regularizer, before_step)
    config = config if config is not None else FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    device = dist_utils.process_device(config.device)
    ctx = dist_utils.start(device)
    try:
        result = _run(model, train_loader, val_loader, config, teacher, progress, device, ctx, hooks)
    except BaseException:
        dist_utils.stop(ctx, wait=False)
        raise
    dist_utils.stop(ctx)
    return result


def _run(model: nn.Module, train_loader: DataLoader, val_loader: Iterable | None, config: FinetuneConfig,
         teacher: nn.Module | None, progress: bool, device: torch.device, ctx: dist_utils.DistContext,
         hooks: TrainHooks) -> FinetuneResult:
    home, was_training = _device_of(model), model.training
    teacher_home = _device_of(teacher) if teacher is not None else None
    try:
        return _train_and_evaluate(model, train_loader, val_loader, config, teacher, progress, device, ctx,
                                   hooks)
    except BaseException:
        model.train(was_training)
        raise
    finally:  # trained on the GPU, handed back where the caller keeps it
        model.to(home)
        if teacher is not None:
            teacher.to(teacher_home)


def _train_and_evaluate(model: nn.Module, train_loader: DataLoader, val_loader: Iterable | None,
                        config: FinetuneConfig, teacher: nn.Module | None, progress: bool,
                        device: torch.device, ctx: dist_utils.DistContext,
                        hooks: TrainHooks) -> FinetuneResult:
    model.to(device)
    apply_masks_(model)
    loader = dist_utils.shard_loader(train_loader, ctx, config.seed)
    total = _total_steps(loader, config)
    trainer = _make_trainer(dist_utils.wrap(model, ctx, device), teacher, config, device, total, hooks)
    trainer.rank = ctx.rank
    start = time.perf_counter()
    with _seeded(config.seed + ctx.rank, device):
        steps, loss = _train(trainer, loader, total, progress and ctx.is_main)
    seconds = time.perf_counter() - start
    model.eval()
    if not dist_utils.all_equal(mask_digest(model), ctx):
        raise RuntimeError("masks differ between ranks after fine-tuning; DDP should have broadcast rank 0's")
    val = evaluate(model, val_loader, device=device) if val_loader is not None and ctx.is_main else None
    return FinetuneResult(model, val, steps, round(seconds, 3), loss, ctx.world_size, ctx.rank, str(device))
