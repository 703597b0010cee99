"""The export's default sparsity thresholds follow the CPU: higher where OpenVINO's dense kernels use AMX."""

from __future__ import annotations

import pytest

from vitsparse.compiler.kernel_crossover import CROSSOVERS, KERNEL_FLAGS, cpu_flags, default_min_sparsity

ZEN5 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = ZEN5 + ["amx_tile", "amx_int8", "amx_bf16"]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_amx_raises_the_threshold_of_the_precisions_it_runs(precision) -> None:
    assert default_min_sparsity(precision, SAPPHIRE_RAPIDS) > default_min_sparsity(precision, ZEN5)


def test_f32_keeps_its_threshold_with_amx() -> None:
    assert default_min_sparsity("f32", SAPPHIRE_RAPIDS) == default_min_sparsity("f32", ZEN5)


def test_each_amx_unit_counts_only_for_its_own_precision() -> None:
    int8_only = ZEN5 + ["amx_tile", "amx_int8"]
    assert default_min_sparsity("int8", int8_only) == default_min_sparsity("int8", SAPPHIRE_RAPIDS)
    assert default_min_sparsity("bf16", int8_only) == default_min_sparsity("bf16", ZEN5)


def test_thresholds_are_shares_and_flags_are_known() -> None:
    for crossover in CROSSOVERS.values():
        assert 0.0 < crossover.vector <= 1.0 and (crossover.amx is None or 0.0 < crossover.amx <= 1.0)
        assert crossover.amx_flag is None or crossover.amx_flag in KERNEL_FLAGS
    assert set(cpu_flags()) <= set(KERNEL_FLAGS)
    assert default_min_sparsity("int8") == default_min_sparsity("int8", cpu_flags())
