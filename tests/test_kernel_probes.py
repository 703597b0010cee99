"""kernels/probes/: the stand-alone C++ probes the results pages quote build and print what they claim to.
No speed is checked here: the figures live in docs/results/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vitsparse.runtime.kernel_crossover import cpu_flags

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
