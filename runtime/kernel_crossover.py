"""Below which sparsity OpenVINO's dense kernels beat vitsparse's sparse ones, per precision and CPU.

The sparse-kernel export keeps a layer a dense MatMul below this share of zeros, and `openvino-sparse`
warns when it loads a file whose kernel nodes have fewer zeros than the crossover of the CPU it runs
on (runtime/kernel_nodes.py, `below_crossover`). The figures are the
crossovers `python -m vitsparse.bench.kernel_speed` measured on DeiT-S's linear shapes (every layer,
batch 1 and 16, rounded up to the next 5 %). Where the CPU has AMX, OpenVINO runs dense INT8 and bf16
on the tile unit, and the kernels (vpdpbusd, vdpbf16ps, and the transposes that write their output)
pay only at higher sparsity: docs/results/2026-12-06-amx-crossover.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# the vector-instruction flags kernels and engines choose by, as /proc/cpuinfo names them
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class Crossover:
    """A precision's crossover without AMX, and with the AMX unit OpenVINO's dense kernels use for it."""

    vector: float
    amx: float | None = None  # None: OpenVINO runs this precision on the vector unit with AMX too
    amx_flag: str | None = None

    def on(self, flags: Iterable[str]) -> float:
        return self.amx if self.amx is not None and self.amx_flag in set(flags) else self.vector


CROSSOVERS: dict[str, Crossover] = {
    "int8": Crossover(vector=0.75, amx=0.85, amx_flag="amx_int8"),
    "bf16": Crossover(vector=0.75, amx=0.95, amx_flag="amx_bf16"),
    "f32": Crossover(vector=0.75),
}


@cache
def cpu_flags() -> tuple[str, ...]:
    """This CPU's KERNEL_FLAGS, from /proc/cpuinfo (empty where there is none); read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    lines = text.splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return tuple(flag for flag in KERNEL_FLAGS if flag in flags)


def default_min_sparsity(precision: str, flags: Iterable[str] | None = None) -> float:
    """The crossover for layers computed in `precision` ("int8", "bf16", "f32") on a CPU with `flags`
    (None: this one)."""
    return CROSSOVERS[precision].on(cpu_flags() if flags is None else flags)
