"""The prune-and-bench workflow: the built-in model through every method that has landed.

Today only the dense baseline exists: the export pass, the CPU engines and the first pruning
method arrive with the next issue, and each one adds its rows here.
"""

from __future__ import annotations

import time

from vitsparse.compiler import count_costs, trace
from vitsparse.models import build_model, digits_loaders, evaluate

LANDED_METHODS = ("dense",)


def run_prune_and_bench(profile: str = "default") -> int:
    """Build (or load) digits-vit, measure the dense row, print it; returns an exit code."""
    started = time.perf_counter()
    model = build_model("digits-vit", pretrained=True)
    result = evaluate(model, digits_loaders().test)
    costs = count_costs(trace(model))
    print(f"prune-and-bench (profile {profile}) on digits-vit, methods landed: {', '.join(LANDED_METHODS)}")
    print(f"{'method':<10} {'top1':>7} {'MACs':>10} {'params':>10}")
    print(f"{'dense':<10} {result.top1:>7.2%} {costs.macs / 1e6:>9.2f}M {costs.params / 1e6:>9.3f}M")
    print("not yet: pruning methods, ONNX export and engine timings land with the export/runtime issue")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0
