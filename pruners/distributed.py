"""torchrun support for fine-tuning: read the launcher's env, start/stop the process group, shard the data.

Under `torchrun --nproc_per_node N` the env holds WORLD_SIZE/RANK/LOCAL_RANK; without it the
context is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: world size, ranks, and whether we started the process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def start(device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistContext(world, dist.get_rank(), local, owns)


def stop(ctx: DistContext, wait: bool = True) -> None:
    """Wait for every rank (unless failing), then tear the process group down if `start` created it."""
    if ctx.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


def process_device(requested: str | torch.device | None) -> torch.device:
    """The device override, else cuda:LOCAL_RANK when CUDA is present, else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        local_rank = _env_int("LOCAL_RANK", 0)
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"this process has LOCAL_RANK {local_rank} but the machine has "
                             f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes "
                             f"per node, or pass FinetuneConfig(device='cpu')")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shard_loader(loader: DataLoader, ctx: DistContext, seed: int) -> DataLoader:
    """The same data and batch size, split over ranks by a shuffling DistributedSampler."""
    if not ctx.distributed:
        return loader
    if loader.batch_size is None:
        raise ValueError("distributed fine-tuning needs a DataLoader built with batch_size=..., not a "
                         "batch_sampler: each rank re-shards the dataset with a DistributedSampler")
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around `model` when distributed; construction broadcasts rank 0's parameters and buffers
    (so every rank starts from rank 0's weights and masks)."""
    if not ctx.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_equal(value: str, ctx: DistContext) -> bool:
    """Whether every rank holds the same string (e.g. a mask digest)."""
    if not ctx.distributed:
        return True
    values: list = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)
