"""Below which sparsity OpenVINO's dense kernels beat vitsparse's sparse ones, per precision and CPU.

The sparse-kernel export keeps a layer a dense MatMul below this share of zeros, and `openvino-sparse`
warns when it loads a file whose kernel nodes have fewer zeros than the crossover of the CPU it runs
on (runtime/kernel_nodes.py, `below_crossover`). The figures are the
crossovers `python -m vitsparse.bench.kernel_speed` measured on DeiT-S's linear shapes (every layer,
batch 1 and 16, rounded up to the next 5 %). Where the CPU has AMX, OpenVINO runs dense INT8 and bf16
on the tile unit, and the kernels (vpdpbusd, vdpbf16ps, and the transposes that write their output)
pay only at higher sparsity: docs/results/2026-12-06-amx-crossover.md. Where the CPU runs 512-bit
vectors as two 256-bit halves (AMD Zen 4), OpenVINO's dense MatMuls, bound by their multiply-adds, slow
down more than the kernels, and these pay from lower sparsity:
docs/results/2026-12-07-zen4-sparse-kernels.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# AVX-512 executed as two 256-bit halves; /proc/cpuinfo has no flag for it, so cpu_flags adds this name
HALF_WIDTH_AVX512 = "half_width_avx512"
# the vector-instruction flags kernels and engines choose by, as /proc/cpuinfo names them, and the one above
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
                HALF_WIDTH_AVX512)


@dataclass(frozen=True)
class Crossover:
    """A precision's crossover on the vector unit, on a half-width one, and with the AMX unit OpenVINO's
    dense kernels use for it."""

    vector: float
    half_width: float  # where the CPU has HALF_WIDTH_AVX512 (and no AMX for this precision)
    amx: float | None = None  # None: OpenVINO runs this precision on the vector unit with AMX too
    amx_flag: str | None = None

    def on(self, flags: Iterable[str]) -> float:
        flags = set(flags)
        if self.amx is not None and self.amx_flag in flags:
            return self.amx
        return self.half_width if HALF_WIDTH_AVX512 in flags else self.vector


CROSSOVERS: dict[str, Crossover] = {
    "int8": Crossover(vector=0.75, half_width=0.55, amx=0.85, amx_flag="amx_int8"),
    "bf16": Crossover(vector=0.75, half_width=0.6, amx=0.95, amx_flag="amx_bf16"),
    "f32": Crossover(vector=0.75, half_width=0.65),
}


@cache
def cpu_flags() -> tuple[str, ...]:
    """This CPU's KERNEL_FLAGS, from /proc/cpuinfo (empty where there is none)."""
    fields = _cpuinfo_fields()
    flags = set(fields.get("flags", "").split())
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25" and "avx512f" in flags:
        flags.add(HALF_WIDTH_AVX512)  # family 25 with AVX-512 is Zen 4 (Zen 3, the same family, has none)
    return tuple(flag for flag in KERNEL_FLAGS if flag in flags)


def cpu_model() -> str:
    """This CPU's model name as /proc/cpuinfo gives it ("AMD EPYC"), or "" where there is none."""
    return _cpuinfo_fields().get("model name", "")


@cache
def _cpuinfo_fields() -> dict[str, str]:
    """The `name : value` lines of /proc/cpuinfo's first processor (empty where there is no such file);
    read once per process, for cpu_flags and cpu_model both."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def default_min_sparsity(precision: str, flags: Iterable[str] | None = None) -> float:
    """The crossover for layers computed in `precision` ("int8", "bf16", "f32") on a CPU with `flags`
    (None: this one)."""
    return CROSSOVERS[precision].on(cpu_flags() if flags is None else flags)
