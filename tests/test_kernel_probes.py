"""kernels/probes/ (the stand-alone C++ probes) and kernels/bench/kernel_time.cpp (one-core kernel
timings): what the results pages quote builds and prints what it claims to. No speed is checked here:
the figures live in docs/results/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vitsparse.runtime.kernel_crossover import cpu_flags
from vitsparse.runtime.sparse_extension import ENV_ISA, extension_path

PROBES = Path(__file__).resolve().parent.parent / "kernels" / "probes"
COMPILER = shutil.which("g++")
WORKING_SETS = ["4 KiB", "16 KiB", "32 KiB", "64 KiB", "256 KiB", "1024 KiB", "16 KiB, never written"]

needs_vnni = pytest.mark.skipif(
    COMPILER is None or not {"avx512f", "avx512_vnni"} <= set(cpu_flags()),
    reason="needs g++ and a CPU with AVX-512 VNNI",
)
# what the probes' build lines (at their top) need, plus -Werror
# (and -Wno-maybe-uninitialized: gcc 12 warns about its own AVX-512 intrinsics)
FLAGS = ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-maybe-uninitialized", "-mavx512f",
         "-mavx512bw", "-mavx512vnni", "-pthread"]


def _build(folder: Path, name: str, flags: list[str] = FLAGS) -> Path:
    binary = folder / name
    subprocess.run([COMPILER, *flags, str(PROBES / f"{name}.cpp"), "-o", str(binary)], check=True)
    return binary


@pytest.fixture(scope="module")
def load_rate(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("probe"), "load_rate")


@pytest.fixture(scope="module")
def block16x4_rate(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("probe"), "block16x4_rate")


@needs_vnni
def test_the_load_rate_probe_prints_one_row_per_working_set(load_rate) -> None:
    out = subprocess.run([str(load_rate), "2000"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^vpdpbusd on registers: \d+\.\d\d G/s$", out, re.M)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "G/s" not in line]
    assert [cells[0].strip() for cells in rows] == WORKING_SETS
    for cells in rows:
        assert all(float(rate) > 0 for rate in cells[1:]), cells


@needs_vnni
def test_the_load_rate_probe_refuses_a_bad_iteration_count(load_rate) -> None:
    done = subprocess.run([str(load_rate), "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


@needs_vnni
@pytest.mark.parametrize("args", [["64", "64", "7", "0.3", "2", "3"], ["48", "32", "1", "0.5", "2", "3"],
                                  ["384", "384", "100", "0.9", "1", "3"], ["32", "16", "9", "1.0", "2", "3"]])
def test_the_16x4_probe_checks_its_sums_before_timing(block16x4_rate, args) -> None:
    out = subprocess.run([str(block16x4_rate), *args], capture_output=True, text=True, check=True).stdout
    error = float(re.search(r"largest error (\S+)$", out.strip()).group(1))
    assert error < 1e-3
    assert re.search(r": \d+\.\d{3} ms \(fastest of 3 calls\)", out)


# none; K not a multiple of 16; sparsity above 1; no input rows
BAD_ARGUMENTS = [[], ["30", "16", "8", "0.5"], ["32", "16", "8", "1.5"], ["32", "16", "0", "0.5"]]


@needs_vnni
@pytest.mark.parametrize("args", BAD_ARGUMENTS)
def test_the_16x4_probe_refuses_bad_arguments(block16x4_rate, args) -> None:
    done = subprocess.run([str(block16x4_rate), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr


needs_amx = pytest.mark.skipif(
    COMPILER is None or not {"avx512f", "amx_tile", "amx_int8"} <= set(cpu_flags()),
    reason="needs g++ and a CPU with AMX-INT8",
)


@pytest.fixture(scope="module")
def amx16x4_rate(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("probe"), "amx16x4_rate", [*FLAGS, "-mamx-tile", "-mamx-int8"])


# a partial tile of 16 blocks, one input row, several output groups, no block at all, every block
@needs_amx
@pytest.mark.parametrize("args", [["64", "64", "7", "0.3", "3"], ["48", "32", "1", "0.5", "3"],
                                  ["384", "384", "100", "0.9", "3"], ["32", "16", "9", "1.0", "3"],
                                  ["128", "32", "33", "0.0", "3"]])
def test_the_amx_probe_checks_its_sums_before_timing(amx16x4_rate, args) -> None:
    out = subprocess.run([str(amx16x4_rate), *args], capture_output=True, text=True, check=True).stdout
    error = float(re.search(r"largest error (\S+)$", out.strip()).group(1))
    assert error < 1e-3
    assert re.search(r": \d+\.\d{3} ms \(fastest of 3 calls, one core\)", out)


@needs_amx
@pytest.mark.parametrize("args", BAD_ARGUMENTS)
def test_the_amx_probe_refuses_bad_arguments(amx16x4_rate, args) -> None:
    done = subprocess.run([str(amx16x4_rate), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr


BUILD = extension_path().parent / "build"  # where `make install` configured the kernels
needs_build = pytest.mark.skipif(
    shutil.which("cmake") is None or not (BUILD / "CMakeCache.txt").exists(),
    reason=f"needs cmake and the kernels' build folder ({BUILD}) that make install makes",
)


@pytest.fixture(scope="module")
def kernel_time() -> Path:
    subprocess.run(["cmake", "--build", str(BUILD), "--target", "kernel_time"], check=True,
                   capture_output=True)
    return BUILD / "kernel_time"


@needs_build
@pytest.mark.parametrize("isa", ["scalar", "avx512"])
def test_the_kernel_timer_times_each_kernel_on_the_path_asked_for(kernel_time, monkeypatch, isa) -> None:
    monkeypatch.setenv(ENV_ISA, isa)
    linear = subprocess.run([str(kernel_time), "linear", "13", "17", "5", "0.5", "3", "--cold"],
                            capture_output=True, text=True, check=True).stdout
    mlp = subprocess.run([str(kernel_time), "mlp", "20", "0.1", "2"], capture_output=True, text=True,
                         check=True).stdout
    number = r"\d+\.\d{3}"
    assert re.fullmatch(rf"linear K13 M17 N5 density 0\.50: median {number} ms, fastest {number} ms "
                        rf"\(3 calls, one thread, cold caches, \w+\)\n", linear)
    assert re.fullmatch(rf"mlp 384-1536-384 N20 density 0\.10: median {number} ms, fastest {number} ms "
                        rf"\(2 calls, one thread, hot caches, \w+\)\n", mlp)
    if isa == "scalar":  # a path above the CPU's runs the next one down, so only scalar is certain
        assert linear.endswith("scalar)\n") and mlp.endswith("scalar)\n")


@needs_build
@pytest.mark.parametrize("args, message", [(["conv"], "unknown kernel conv"),
                                           (["linear", "8", "0", "4", "0.5"], "M must be a positive integer"),
                                           (["mlp", "4", "1.5"], r"DENSITY must be in \(0, 1\]"),
                                           (["mlp", "4"], "wrong number of arguments")])
def test_the_kernel_timer_refuses_bad_arguments(kernel_time, args, message) -> None:
    result = subprocess.run([str(kernel_time), *args], capture_output=True, text=True)
    assert result.returncode == 2 and re.search(message, result.stderr) and "usage:" in result.stderr
