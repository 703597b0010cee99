"""runtime/ timing: benchmark scenarios, the side-by-side timer's block order, the bench CLI, atomic JSON.

Budgets are tiny and nothing asserts speed: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_runtime import AVAILABLE, tiny_mlp

from vitsparse.runtime import (
    RuntimeInputError,
    benchmark,
    benchmark_model,
    compare_side_by_side,
    configure_bench_parser,
    create_engine,
    run_bench,
    write_json_atomic,
)
from vitsparse.runtime.atomic import atomic_dir, atomic_path
from vitsparse.runtime.timing import Budget, concurrent_calls, timed_calls

from helpers import BLOCK_TORCH

TINY = {"seconds": 0.15, "warmup_seconds": 0.05}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_mlp(tmp_path_factory.mktemp("bench") / "mlp.onnx")[0]


def assert_sane(result, *, scenario: str, streams: int) -> None:
    lat = result.latency_ms
    assert result.iterations > 0 and result.items_per_sec > 0 and result.seconds > 0
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["mean"] > 0
    assert (result.scenario, result.num_streams) == (scenario, streams)
    json.dumps(result.to_dict())


@pytest.mark.parametrize("engine", AVAILABLE)
def test_sync_benchmark(model, engine: str) -> None:
    built = create_engine(engine, model, batch_size=2, num_cores=1)
    result = benchmark(built, **TINY)
    assert_sane(result, scenario="sync", streams=1)
    assert (result.engine, result.batch_size, result.model) == (engine, 2, str(model))
    assert result.fraction_of_supported_ops == built.fraction_of_supported_ops
    assert benchmark(built, iterations=7, warmup_seconds=0).iterations == 7


@pytest.mark.parametrize("engine", AVAILABLE)
def test_async_benchmark_runs_several_streams(model, engine: str) -> None:
    result = benchmark_model(model, engine, batch_size=2, num_cores=2, scenario="async", num_streams=2,
                             **TINY)
    assert_sane(result, scenario="async", streams=2)
    assert benchmark_model(model, engine, scenario="async", num_streams=2, iterations=9,
                           warmup_seconds=0).iterations == 9


def test_benchmark_settings_are_checked(model) -> None:
    built = create_engine("onnxruntime", model)
    for kwargs, message in [({"scenario": "batch"}, "unknown scenario 'batch'; choose from sync, async"),
                            ({"num_streams": 2}, "sync scenario runs one stream"),
                            ({"seconds": 0}, "seconds must be > 0"), ({"iterations": 0}, "iterations")]:
        with pytest.raises(RuntimeInputError, match=message):
            benchmark(built, **kwargs)
    with pytest.raises(RuntimeInputError, match=r"expected shape \(1, 16\) float32, got \(1, 8\)"):
        benchmark(built, [np.zeros((1, 8), np.float32)], iterations=1)


def recording_runner(log: list[tuple[str, float]], name: str):
    def run() -> None:
        log.append((name, time.perf_counter()))
        time.sleep(0.001)
    return run


def test_side_by_side_times_each_runner_in_blocks_alternating_across_rounds() -> None:
    log: list[tuple[str, float]] = []
    runners = {name: recording_runner(log, name) for name in ("a", "b", "c")}
    heard: list[str] = []
    results = compare_side_by_side(runners, batch_size=4, rounds=3, seconds_per_block=0.02, warmup=0.005,
                                   on_block=heard.append)
    blocks = [name for i, (name, _) in enumerate(log) if i == 0 or log[i - 1][0] != name]
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # one block per runner per round, rotating
    assert heard == blocks  # told of each block as it ends
    assert list(results) == ["a", "b", "c"]
    for name, result in results.items():
        assert_sane(result, scenario="sync", streams=1)
        assert result.engine == name and result.batch_size == 4 and len(result.block_items_per_sec) == 3
        calls = sum(1 for who, _ in log if who == name)
        assert 3 <= result.iterations < calls  # warm-up calls are made but not counted


def test_side_by_side_with_live_engines(model) -> None:
    runners = {}
    for engine in AVAILABLE:
        built = create_engine(engine, model, batch_size=2, num_cores=1)
        inputs = built.random_inputs()
        runners[engine] = lambda built=built, inputs=inputs: built.run(inputs)
    runners["numpy"] = lambda: np.ones((2, 16)) @ np.ones((16, 10))
    results = compare_side_by_side(runners, batch_size=2, rounds=2, seconds_per_block=0.05, warmup=0.01)
    assert set(results) == {*AVAILABLE, "numpy"}
    with pytest.raises(RuntimeInputError, match="at least one runner"):
        compare_side_by_side({}, batch_size=1)
    with pytest.raises(RuntimeInputError, match="rounds must be a positive integer"):
        compare_side_by_side(runners, batch_size=1, rounds=0)


def test_timing_loops_honour_call_budgets_and_raise_worker_errors() -> None:
    assert len(timed_calls(lambda: None, Budget(calls=5))) == 5
    assert len(concurrent_calls(lambda: None, Budget(calls=11), num_threads=3)) == 11

    def boom() -> None:
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        concurrent_calls(boom, Budget(seconds=1.0), num_threads=2)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vitsparse bench")
    configure_bench_parser(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("engine", AVAILABLE)
def test_bench_cli_end_to_end_writes_json_atomically(model, tmp_path, capsys, engine: str) -> None:
    out = tmp_path / "results" / "bench.json"
    args = bench_args(str(model), "-e", engine, "-b", "2", "-ncores", "2", "-s", "async", "-nstreams", "2",
                      "-t", "0.15", "-w", "0.05", "-x", str(out))
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    assert report["engine"] == engine and report["batch_size"] == 2 and report["scenario"] == "async"
    assert report["num_streams"] == 2 and report["iterations"] > 0
    assert set(report["latency_ms"]) == {"mean", "p50", "p90", "p99"}
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temp file left
    printed = capsys.readouterr().out
    assert "items/sec" in printed and "p99" in printed and engine in printed
    if engine == "deepsparse":
        assert report["fraction_of_supported_ops"] == 1.0 and "fraction_of_supported_ops=1.0000" in printed


def test_bench_cli_defaults_and_errors(model, tmp_path) -> None:
    args = bench_args(str(model))
    assert (args.batch_size, args.scenario, args.time, args.num_cores, args.export_path) == (1, "sync", 10.0,
                                                                                             None, None)
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        run_bench(bench_args(str(tmp_path / "nope.onnx"), "-t", "0.1"))
    with pytest.raises(SystemExit):
        bench_args(str(model), "-e", "tensorrt")


def test_atomic_json_leaves_the_old_file_on_failure(tmp_path) -> None:
    target = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


RUN_WITHOUT_TORCH = BLOCK_TORCH + """
from vitsparse.runtime import benchmark, create_engine, engine_status, inspect_onnx
for name in ("deepsparse", "onnxruntime"):
    if engine_status(name).available:
        engine = create_engine(name, sys.argv[1], batch_size=2)
        assert benchmark(engine, iterations=3, warmup_seconds=0).iterations == 3
assert inspect_onnx(sys.argv[1]).macs == 832
assert "torch" not in sys.modules
print("ok")
"""


def test_engines_run_where_torch_is_missing(model) -> None:
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(model)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_atomic_path_publishes_a_readable_file_and_cleans_up_on_failure(tmp_path) -> None:
    target = tmp_path / "sub" / "w.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["w.bin"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "stage"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "b").write_text("2")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a"]
    with atomic_dir(target) as staging:
        (staging / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["stage"]
    assert target.stat().st_mode & 0o777 == 0o755
