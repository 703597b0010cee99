"""The export's default sparsity thresholds follow the CPU: higher where OpenVINO's dense kernels use AMX.
The runtime finds the kernel nodes of a file below the crossover of the CPU it runs on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from vitsparse.compiler.sparse_onnx import (
    block_sparsity,
    make_mlp_node,
    make_node,
    pack_bf16_pairs,
    pack_f32_csr,
    pack_int8_blocks,
)
from vitsparse.runtime import kernel_crossover
from vitsparse.runtime.kernel_crossover import (
    CROSSOVERS,
    HALF_WIDTH_AVX512,
    KERNEL_FLAGS,
    cpu_flags,
    default_min_sparsity,
)
from vitsparse.runtime.kernel_nodes import below_crossover, kernel_layers

ZEN5 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = ZEN5 + ["amx_tile", "amx_int8", "amx_bf16"]
ZEN4 = ZEN5 + [HALF_WIDTH_AVX512]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_amx_raises_the_threshold_of_the_precisions_it_runs(precision) -> None:
    assert default_min_sparsity(precision, SAPPHIRE_RAPIDS) > default_min_sparsity(precision, ZEN5)


def test_f32_keeps_its_threshold_with_amx() -> None:
    assert default_min_sparsity("f32", SAPPHIRE_RAPIDS) == default_min_sparsity("f32", ZEN5)


def test_each_amx_unit_counts_only_for_its_own_precision() -> None:
    int8_only = ZEN5 + ["amx_tile", "amx_int8"]
    assert default_min_sparsity("int8", int8_only) == default_min_sparsity("int8", SAPPHIRE_RAPIDS)
    assert default_min_sparsity("bf16", int8_only) == default_min_sparsity("bf16", ZEN5)


@pytest.mark.parametrize("precision", ["int8", "bf16", "f32"])
def test_half_width_avx512_lowers_every_threshold(precision) -> None:
    assert default_min_sparsity(precision, ZEN4) < default_min_sparsity(precision, ZEN5)


def _cpuinfo(vendor: str, family: int, flags: str) -> str:
    one = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n\n"
    return one.format(0) + one.format(1)


@pytest.mark.parametrize(("vendor", "family", "flags", "half_width"), [
    ("AuthenticAMD", 25, "fpu avx2 avx512f avx512_vnni avx512_bf16", True),  # Zen 4
    ("AuthenticAMD", 25, "fpu avx2", False),  # Zen 3: the same family, no AVX-512
    ("AuthenticAMD", 26, "fpu avx2 avx512f avx512_vnni avx512_bf16", False),  # Zen 5
    ("GenuineIntel", 6, "fpu avx2 avx512f avx512_vnni amx_tile amx_int8", False),
])
def test_cpu_flags_name_half_width_avx512_for_zen4_only(tmp_path, monkeypatch, vendor, family, flags,
                                                        half_width) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_cpuinfo(vendor, family, flags))
    real_path = kernel_crossover.Path
    monkeypatch.setattr(kernel_crossover, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    caches = (kernel_crossover.cpu_flags, kernel_crossover._cpuinfo_fields)
    for cached in caches:
        cached.cache_clear()
    try:
        found = kernel_crossover.cpu_flags()
    finally:
        for cached in caches:
            cached.cache_clear()
    assert (HALF_WIDTH_AVX512 in found) == half_width
    named = set(flags.split()) & set(KERNEL_FLAGS)
    assert set(found) == named | ({HALF_WIDTH_AVX512} if half_width else set())


def test_thresholds_are_shares_and_flags_are_known() -> None:
    for crossover in CROSSOVERS.values():
        assert 0.0 < crossover.vector <= 1.0 and 0.0 < crossover.half_width <= 1.0
        assert crossover.amx is None or 0.0 < crossover.amx <= 1.0
        assert crossover.amx_flag is None or crossover.amx_flag in KERNEL_FLAGS
    assert set(cpu_flags()) <= set(KERNEL_FLAGS)
    assert default_min_sparsity("int8") == default_min_sparsity("int8", cpu_flags())


def _int8_node(codes: np.ndarray):
    return make_node("layer", "x", "y", pack_int8_blocks(codes, np.ones(codes.shape[0], np.float32)))


def _graph(node_and_inits) -> onnx.GraphProto:
    node, inits = node_and_inits
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    return helper.make_graph([node], "g", [x], [y], inits)


def test_a_kernel_node_counts_its_zeros_as_the_export_does() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 10)).astype(np.float32) * (rng.random((6, 10)) < 0.3)
    codes = (rng.integers(1, 100, (6, 10)) * (rng.random((6, 10)) < 0.3)).astype(np.int8)
    ones = np.ones(6, np.float32)
    cases = [(make_node("l", "x", "y", pack_int8_blocks(codes, ones)), block_sparsity(codes)),
             (make_node("l", "x", "y", pack_bf16_pairs(weight)), block_sparsity(weight, 2)),
             (make_node("l", "x", "y", pack_f32_csr(weight)), float((weight == 0).mean()))]
    for node_and_inits, expected in cases:
        (layer,) = kernel_layers(_graph(node_and_inits))["l"]
        assert layer.zero_share == pytest.approx(expected)


def test_layers_below_the_hosts_crossover_are_found() -> None:
    rng = np.random.default_rng(1)
    graph = _graph(_int8_node(_sparse_codes(rng, 20, 16, 0.8)))
    assert kernel_layers(graph)["layer"][0].zero_share == pytest.approx(0.8)
    assert below_crossover(graph, ZEN5) == []  # exported for a CPU without AMX, where 80 % pays
    (slow,) = below_crossover(graph, SAPPHIRE_RAPIDS)  # with AMX-INT8 dense wins below 85 %
    assert slow.name == "layer" and slow.precision == "int8"
    assert below_crossover(_graph(_int8_node(_sparse_codes(rng, 20, 16, 0.9))), SAPPHIRE_RAPIDS) == []


def test_each_product_of_an_mlp_node_is_checked() -> None:
    rng = np.random.default_rng(2)
    fc1 = pack_int8_blocks(_sparse_codes(rng, 20, 8, 0.9), np.ones(20, np.float32))  # 90 % zero blocks
    fc2 = pack_int8_blocks(_sparse_codes(rng, 8, 20, 0.8), np.ones(8, np.float32))  # 80 %
    node = make_mlp_node("mlp", "x", "y", fc1, np.zeros((20, 256), np.uint8), fc2, {"act_scale": 1.0})
    shares = [layer.zero_share for layer in kernel_layers(_graph(node))["mlp"]]
    assert shares == pytest.approx([0.9, 0.8])
    assert [layer.name for layer in below_crossover(_graph(node), SAPPHIRE_RAPIDS)] == ["mlp/fc2"]


def _sparse_codes(rng, rows: int, cols: int, share: float) -> np.ndarray:
    """INT8 codes with exactly round(share × blocks) all-zero 1×4 blocks (cols a multiple of 4)."""
    keep = np.ones(rows * cols // 4, bool)
    keep[rng.permutation(keep.size)[:round(share * keep.size)]] = False
    return (np.repeat(keep.reshape(rows, -1), 4, axis=1) * rng.integers(1, 100, (rows, cols))).astype(np.int8)
