"""Speed rows are timed in memory-bounded groups, each beside its own timing of the baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitsparse.bench import speed
from vitsparse.bench.report import int8_speed_table
from vitsparse.bench.schema import Row, SpeedEntry
from vitsparse.bench.speed import SpeedCandidate, TimingPlan, measure_speed, timing_groups
from vitsparse.bench.workflow import BenchOptions, _speed_model
from vitsparse.compiler import ExportError, Recipe, trace
from vitsparse.models import build_model
from vitsparse.runtime import BenchmarkResult, kernel_crossover
from vitsparse.runtime.kernel_crossover import HALF_WIDTH_AVX512

SPARSITIES = (0.5, 0.6, 0.7)


def _candidates() -> list[SpeedCandidate]:
    graph = trace(build_model("digits-vit"))
    rows = [Row("digits-vit", "dense"), Row("digits-vit", "int8", {"base": "dense", "format": "qdq"}),
            *(Row("digits-vit", "magnitude", {"sparsity": s}) for s in SPARSITIES)]
    return [SpeedCandidate(row, graph, Recipe()) for row in rows]


def test_a_baseline_an_entry_asks_for_carries_the_entry(monkeypatch) -> None:
    """`int8=dense` asks for the dense QDQ file, which is already a baseline: that row takes the entry's
    label, so the summary compares OpenVINO's INT8 with DeepSparse's (it saw only DeepSparse's)."""
    from types import SimpleNamespace

    from vitsparse.bench import workflow

    baselines = _candidates()[:2]
    monkeypatch.setattr(workflow, "_baselines", lambda ctx: baselines)
    asked = [SpeedCandidate(Row("digits-vit", "int8", {"base": "dense", "format": form}), None, Recipe())
             for form in ("qdq", "operator")]
    item = SimpleNamespace(entry=SimpleNamespace(label="int8=dense"), setting=None,
                           spec=SimpleNamespace(speed_candidates=lambda setting, ctx: asked,
                                                shared_baselines=lambda setting, ctx: []))
    progress = SimpleNamespace(done=lambda *args: None)
    candidates = workflow._speed_candidates([item], SimpleNamespace(model_name="digits-vit"), progress)
    assert [c.row.entry for c in candidates] == [None, "int8=dense", "int8=dense"]
    assert candidates[1] is baselines[1]  # timed once, as the baseline


def test_int8_dense_counts_the_dense_qdq_baseline_as_its_own(monkeypatch) -> None:
    """The int8 spec leaves dense QDQ to the workflow's baseline, not built twice, and names it as
    shared: the baseline row carries `int8=dense`, so the summary weighs OpenVINO's dense INT8 beside
    DeepSparse's (it named DeepSparse, at 0.44-0.59x, as int8=dense's fastest engine)."""
    from types import SimpleNamespace

    from vitsparse.bench import int8, workflow

    baselines = _candidates()[:2]
    monkeypatch.setattr(workflow, "_baselines", lambda ctx: baselines)
    built = []

    def fake_candidate(ctx, masks, form):  # the row the real one makes, without tracing and calibrating
        built.append(form)
        return SpeedCandidate(Row("digits-vit", "int8", int8.Int8SpeedSetting(masks, form).settings()), None,
                              Recipe())

    monkeypatch.setattr(int8, "int8_speed_candidate", fake_candidate)
    spec = int8.Int8Spec()
    item = SimpleNamespace(entry=SimpleNamespace(label="int8=dense"), setting=spec.parse("dense"), spec=spec)
    ctx = SimpleNamespace(model_name="digits-vit", int8_formats=("qdq", "operator"))
    candidates = workflow._speed_candidates([item], ctx, SimpleNamespace(done=lambda *args: None))
    assert built == ["operator"]  # dense QDQ is the baseline's
    assert [(c.row.settings.get("format"), c.row.entry) for c in candidates] == [
        (None, None), ("qdq", "int8=dense"), ("operator", "int8=dense")]


def test_every_group_holds_the_baselines_and_at_most_the_given_number_of_others() -> None:
    candidates = _candidates()
    assert timing_groups(candidates, 2) == [[0, 1, 2, 3], [0, 1, 4]]
    assert timing_groups(candidates, 8) == [[0, 1, 2, 3, 4]]
    assert timing_groups(candidates[:2], 8) == [[0, 1]]


def test_each_row_is_compared_with_the_baselines_timed_beside_it(tmp_path: Path, monkeypatch) -> None:
    groups_timed: list[list[str]] = []
    warmups: list[float] = []

    def fake_compare(runners, *, batch_size, rounds, seconds_per_block, warmup, on_block):
        """The n-th group runs at 1/(n+1) of the speed: baselines 10(n+1) ms, the rest 5(n+1) ms."""
        slowdown = len(groups_timed) + 1
        groups_timed.append(list(runners))
        warmups.append(warmup)
        for label in runners:
            on_block(label)
        return {label: BenchmarkResult(label, batch_size, "sync", 1, 10, 1.0, 10.0 * batch_size,
                                       {"p50": (10.0 if label.startswith(("dense", "int8")) else 5.0)
                                        * slowdown})
                for label in runners}

    monkeypatch.setattr(speed, "compare_side_by_side", fake_compare)
    candidates = _candidates()
    plan = TimingPlan(batch_sizes=(1,), engines=("torch",), rounds=1, seconds_per_block=0.1, num_cores=None,
                      models_per_group=2)
    measure_speed(candidates, plan, tmp_path)

    assert len(groups_timed) == 2 and all(len(labels) <= 4 for labels in groups_timed)
    assert warmups == [0.1, 0.1]  # as long as the 0.1 s blocks, not the usual half second
    assert all(any(label.startswith("dense") for label in labels) for labels in groups_timed)
    dense, dense_int8, *masked = (c.row for c in candidates)
    assert [s.latency_ms["p50"] for s in dense.speed + dense_int8.speed] == [10.0, 10.0]  # the first group's
    for row in masked:
        (entry,) = row.speed
        assert entry.speedup_vs_dense_torch == pytest.approx(2.0)  # not 1.0: the second group's own dense
        assert entry.speedup_vs_best_dense == pytest.approx(2.0)
    assert masked[-1].speed[0].latency_ms["p50"] == 10.0  # timed in the second, slower group
    assert dense.speed[0].speedup_vs_dense_torch == 1.0 and dense.artifact is not None


def _entry(engine: str, p50: float) -> SpeedEntry:
    return SpeedEntry(engine=engine, batch=1, items_per_sec=1000.0 / p50, latency_ms={"p50": p50})


def test_int8_speed_ups_are_over_the_dense_int8_timed_in_the_same_group() -> None:
    """Two groups whose dense INT8 on ONNX Runtime timed 4 ms and 8 ms: a 2 ms entry is 2× or 4×."""
    sparse = Row("deit", "int8", {"base": "magnitude", "sparsity": 0.9, "format": "operator"})
    for ort_int8_ms, expected in ((4.0, 2.0), (8.0, 4.0)):
        baselines = [Row("deit", "dense", speed=[_entry("torch", 20.0)]),
                     Row("deit", "int8", {"base": "dense", "format": "qdq"},
                         speed=[_entry("onnxruntime", ort_int8_ms), _entry("deepsparse", 3.0)])]
        entry = _entry("deepsparse", 2.0)
        speed._fill_speedups(baselines, [entry])
        sparse.speed = [entry]
        assert entry.speedup_vs_ort_int8 == pytest.approx(expected)
        assert entry.speedup_vs_dense_torch == pytest.approx(10.0)
        assert f"| 2.00 | 10.00× | {expected:.2f}× |" in int8_speed_table([sparse])


def test_without_a_dense_int8_baseline_there_is_no_int8_speed_up() -> None:
    entry = _entry("deepsparse", 2.0)
    speed._fill_speedups([Row("deit", "dense", speed=[_entry("torch", 20.0)])], [entry])
    assert entry.speedup_vs_ort_int8 is None and entry.speedup_vs_dense_torch == pytest.approx(10.0)


@pytest.mark.parametrize("column, dense_column", [("openvino-sparse", "openvino"),
                                                  ("openvino-sparse:bf16", "openvino:bf16")])
def test_openvino_sparse_is_compared_with_the_dense_model_on_openvino(column, dense_column) -> None:
    """The dense model has no sparse layers, so it is timed on openvino only: that is openvino-sparse's
    same-engine baseline (the report's pattern table showed '–' for the whole column)."""
    entry = _entry(column, 5.0)
    other_precision = "openvino:bf16" if dense_column == "openvino" else "openvino"
    baselines = [Row("deit", "dense", speed=[_entry("torch", 20.0), _entry(dense_column, 10.0),
                                            _entry(other_precision, 40.0)])]
    speed._fill_speedups(baselines, [entry])
    assert entry.speedup_vs_dense_same_engine == pytest.approx(2.0)
    other = _entry("onnxruntime", 5.0)
    speed._fill_speedups(baselines, [other])
    assert other.speedup_vs_dense_same_engine is None  # no dense model on ONNX Runtime


def test_a_failed_export_names_its_candidate_and_batch(tmp_path: Path) -> None:
    """A run of dozens of candidates says which one's export failed, not only by how much."""
    candidate = _candidates()[2]
    candidate.export = {"atol": -1.0}  # every difference exceeds it
    plan = TimingPlan(batch_sizes=(2,), engines=("onnxruntime",), rounds=1, seconds_per_block=0.01,
                      num_cores=1)
    with pytest.raises(ExportError, match=r"magnitude\(sparsity=0.5\) at batch 2: .*differs"):
        speed._export_for_batch(candidate, 2, plan, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_the_speed_model_is_the_same_in_every_run_whatever_ran_before() -> None:
    opts = BenchOptions(model="digits-vit", engines=(speed.TORCH,))
    torch.manual_seed(1)
    first = _speed_model(opts).state_dict()
    torch.manual_seed(2)
    torch.rand(100)  # an earlier stage drew from the global generator
    state = torch.random.get_rng_state()
    second = _speed_model(opts).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was


def test_only_rows_with_sparse_layers_are_timed_on_the_kernel_engine() -> None:
    """On a row without masks openvino-sparse would repeat the openvino column."""
    from vitsparse.compiler import PassManager
    from vitsparse.pruners import MagnitudePass, SparsityConfig

    dense = SpeedCandidate(Row("digits-vit", "dense"), trace(build_model("digits-vit")), Recipe())
    manager = PassManager(trace(build_model("digits-vit")), recipe=Recipe())
    manager.run(MagnitudePass(SparsityConfig(sparsity=0.9, pattern="1x4")))
    masked = SpeedCandidate(Row("digits-vit", "magnitude", {"sparsity": 0.9}), manager.graph_module, Recipe())
    engines = ("openvino", "openvino-sparse", "torch")
    assert dense.timed_on(engines) == ["openvino", "torch"]
    assert masked.timed_on(engines) == list(engines)


@pytest.mark.parametrize(("flags", "unstructured_pays"), [
    (("avx2", "avx512f", "avx512_vnni"), False),
    (("avx2", "avx512f", "avx512_vnni", HALF_WIDTH_AVX512), True),
], ids=["int8-crossover-75", "zen4-int8-crossover-55"])
def test_an_int8_row_is_timed_on_the_kernel_engine_only_with_all_zero_1x4_blocks(monkeypatch, flags,
                                                                                   unstructured_pays) -> None:
    """INT8 layers run sparse in 1×4 blocks: 90 % unstructured zeros leave about 0.9⁴ = 66 % of them
    empty, below the INT8 crossover of most CPUs (75 %), where the export keeps every layer dense and the
    kernel engine would repeat the openvino column; above Zen 4's (55 %), where the kernels pay."""
    from vitsparse.compiler import PassManager
    from vitsparse.pruners import MagnitudePass, QuantConfig, QuantizePass, SparsityConfig

    monkeypatch.setattr(kernel_crossover, "cpu_flags", lambda: flags)
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timed = {}
    for pattern in ("1x4", "unstructured"):
        manager = PassManager(trace(build_model("digits-vit")), recipe=Recipe())
        manager.run(MagnitudePass(SparsityConfig(sparsity=0.9, pattern=pattern)))
        manager.run(QuantizePass(QuantConfig(), calibration=images))
        row = Row("digits-vit", "int8", {"sparsity": 0.9, "pattern": pattern})
        timed[pattern] = SpeedCandidate(row, manager.graph_module, Recipe()).timed_on(("openvino-sparse",))
    assert timed["1x4"] == ["openvino-sparse"]
    assert timed["unstructured"] == (["openvino-sparse"] if unstructured_pays else [])


def test_the_kernel_engine_is_never_a_dense_alternative() -> None:
    dense = Row("deit", "dense", speed=[_entry("openvino", 9.0), _entry("openvino-sparse", 1.0)])
    assert speed.best_dense_alternatives([dense]) == {1: ("openvino fp32", 9.0)}


def test_a_short_block_warms_up_no_longer_than_it_is_timed() -> None:
    quick = TimingPlan(batch_sizes=(1,), engines=("openvino",), rounds=1, seconds_per_block=0.05, num_cores=1)
    long = TimingPlan(batch_sizes=(1,), engines=("openvino",), rounds=1, seconds_per_block=2.0, num_cores=1)
    assert quick.warmup_seconds == 0.05 and long.warmup_seconds == 0.5
