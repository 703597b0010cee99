"""kernels/probes/: the stand-alone C++ probes the results pages quote build and print what they claim to.
No speed is checked here: the figures live in docs/results/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vitsparse.bench.prune_report import cpu_flags

PROBE = Path(__file__).resolve().parent.parent / "kernels" / "probes" / "load_rate.cpp"
COMPILER = shutil.which("g++")
WORKING_SETS = ["4 KiB", "16 KiB", "32 KiB", "64 KiB", "256 KiB", "1024 KiB", "16 KiB, never written"]

needs_vnni = pytest.mark.skipif(
    COMPILER is None or not {"avx512f", "avx512_vnni"} <= set(cpu_flags()),
    reason="needs g++ and a CPU with AVX-512 VNNI",
)


@pytest.fixture(scope="module")
def load_rate(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("probe") / "load_rate"
    subprocess.run([COMPILER, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-mavx512f", "-mavx512vnni",
                    str(PROBE), "-o", str(binary)], check=True)
    return binary


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
