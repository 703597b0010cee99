"""Launched by tests/test_pruners.py under torchrun: fine-tune a masked digits-vit with DDP on the CPU.

Rank 1 scrambles its masks before training, so agreeing digests afterwards show that DDP broadcast
rank 0's masks. Each rank writes rank<N>.json (mask digest, zero counts, parameter checksum) to argv[1].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from vitsparse.compiler import PassManager, trace
from vitsparse.models import build_model, digits_loaders
from vitsparse.pruners import FinetuneConfig, MagnitudePass, finetune, mask_digest, masked_modules


def scramble(model: torch.nn.Module, seed: int) -> None:
    """Shuffle the first masked layer's mask (same count, other positions)."""
    module = next(iter(masked_modules(model).values()))
    flat = module.weight_mask.flatten()
    order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    module.weight_mask = flat[order].view_as(module.weight_mask)


def zero_report(model: torch.nn.Module) -> dict:
    layers = masked_modules(model).values()
    return {
        "pruned": sum(int((~m.weight_mask).sum()) for m in layers),
        "zeros": sum(int((m.weight == 0).sum()) for m in layers),
        "masked_nonzero": sum(int(m.weight[~m.weight_mask].count_nonzero()) for m in layers),
    }


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    gm = PassManager(trace(build_model("digits-vit", pretrained=True, progress=False))).run(
        MagnitudePass(sparsity=0.5))
    if rank != 0:
        scramble(gm, seed=rank)
    before = mask_digest(gm)
    loaders = digits_loaders(batch_size=32)
    result = finetune(gm, loaders.train, loaders.val, FinetuneConfig(max_steps=4, lr=1e-3), progress=False)
    report = {"rank": rank, "world_size": result.world_size, "steps": result.steps, "digest_before": before,
              "digest_after": mask_digest(gm), **zero_report(gm),
              "param_checksum": float(sum(p.detach().double().sum() for p in gm.parameters())),
              "val_top1": result.val.top1 if result.val is not None else None}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
