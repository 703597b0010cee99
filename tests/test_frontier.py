"""The combined recipes' staged schedule and frontier: epoch budgets, setting matching across models,
the frontier table and the Pareto points, on hand-made rows."""

from __future__ import annotations

import pytest

from vitsparse.bench.combined import SPEC as COMBINED
from vitsparse.bench.combined import SPEED_RECIPE, CombinedSetting
from vitsparse.bench.frontier import frontier_table, has_pareto_points, pareto_points, setting_key, top1_text
from vitsparse.bench.profiles import FULL
from vitsparse.bench.schema import Row, SpeedEntry
from vitsparse.bench.speed_report import lead_table
from vitsparse.bench.staged import StagedSchedule

SPEED_MODEL = "deit_small_patch16_224"


def _entry(engine: str, batch: int, speedup: float) -> SpeedEntry:
    return SpeedEntry(engine, batch, 100.0, {"p50": 10.0 / speedup, "p99": 12.0 / speedup},
                      speedup_vs_best_dense=speedup, best_dense="openvino int8")


def test_the_schedule_states_its_epoch_budget_per_pass() -> None:
    schedule = StagedSchedule()
    assert schedule.epochs(["vtp"]) == schedule.score_epochs + schedule.recover_epochs
    assert schedule.epochs(["magnitude"]) == (schedule.mask_steps - 1) * schedule.mask_recover_epochs \
        + schedule.mask_epochs
    everything = SPEED_RECIPE.passes()
    assert schedule.epochs(everything) == sum(schedule.epochs([p]) for p in everything)
    with pytest.raises(ValueError, match="integers >= 1"):
        StagedSchedule(mask_steps=0)


def test_the_full_profile_s_frontier_runs_from_light_to_heavy_in_int8() -> None:
    frontier = [COMBINED.parse(e.setting).setting for e in FULL.entries if e.method == "combined"]
    frontier = [s for s in frontier if s.int8]
    assert len(frontier) >= 4
    assert [s.sparsity for s in frontier] == sorted(s.sparsity for s in frontier)
    assert [s.keep_rate for s in frontier] == sorted((s.keep_rate for s in frontier), reverse=True)
    assert frontier[-1] == SPEED_RECIPE


def test_rows_of_one_profile_entry_are_one_setting_across_models() -> None:
    digits = Row("digits-vit", "head-channels", {"budget": 0.3, "variant": "full"}, entry="heads=0.3",
                 top1=0.97, top1_seeds=[0.96, 0.98])
    timed = Row(SPEED_MODEL, "head-channels", {"budget": 0.3, "multiple": 8}, entry="heads=0.3",
                speed=[SpeedEntry("openvino", 1, 100.0, {"p50": 5.0, "p99": 6.0}, speedup_vs_dense_torch=3.0,
                                  speedup_vs_best_dense=0.6, best_dense="openvino int8"),
                       SpeedEntry("torch", 1, 30.0, {"p50": 15.0, "p99": 16.0}, speedup_vs_dense_torch=1.2,
                                  speedup_vs_best_dense=0.2, best_dense="openvino int8")])
    assert setting_key(digits) == setting_key(timed) != setting_key(Row(SPEED_MODEL, "vtp", entry="vtp=0.3"))
    table = lead_table([Row("digits-vit", "dense", top1=0.98), digits, timed])
    assert "| dense | – | 98.00 % |" in table  # the fastest engine, its speed-ups, the same setting's top-1
    assert "| `heads=0.3` | openvino, 3.00×, **0.60×** | 97.00 ± 1.00 % |" in table


def test_the_summary_names_the_fastest_engine_when_pytorch_was_not_timed() -> None:
    """`-e openvino,openvino-sparse` times no PyTorch: the summary still names the fastest engine and its
    speed-up over the best dense alternative (it printed only dashes)."""
    timed = Row(SPEED_MODEL, "int8", {"sparsity": 0.9}, entry="int8=0.9@1x4",
                speed=[SpeedEntry("openvino", 16, 110.0, {"p50": 140.0}, speedup_vs_best_dense=1.03),
                       SpeedEntry("openvino-sparse", 16, 175.0, {"p50": 90.0}, speedup_vs_best_dense=1.59)])
    assert "| `int8=0.9@1x4` | openvino-sparse, –, **1.59×** | – |" in lead_table([timed])


def test_speed_rows_find_the_digits_row_of_the_same_setting() -> None:
    setting = CombinedSetting(int8=True).settings()
    digits = Row("digits-vit", "combined", setting, top1=0.97, top1_seeds=[0.96, 0.97, 0.98])
    timed = Row(SPEED_MODEL, "combined", {**setting, "int8": "qdq"})
    assert setting_key(digits) == setting_key(timed)
    vtp = {"rate": 0.4, "multiple": 8}  # an INT8 twin in any format matches digits-vit's QAT twin only
    twins = [Row(SPEED_MODEL, "vtp", {**vtp, "int8": form}) for form in ("qdq", "operator")]
    assert setting_key(twins[0]) == setting_key(twins[1]) == setting_key(
        Row("digits-vit", "vtp", {**vtp, "int8": "qat"})) != setting_key(Row("digits-vit", "vtp", vtp))
    assert setting_key(Row(SPEED_MODEL, "token-drop", {"keep_rate": 0.7, "int8": "qdq"})) is None
    tokens = {"mode": "fixed", "target_ratio": 0.65, "keep_rate": 0.61}  # digits-vit aims at a FLOPs ratio
    assert setting_key(Row("digits-vit", "token-drop", {**tokens, "int8": "qat"})) == (
        *setting_key(Row("digits-vit", "token-drop", tokens)), "int8")
    assert setting_key(Row(SPEED_MODEL, "int8", {"base": "dense", "format": "qdq"})) == setting_key(
        Row("digits-vit", "int8", {"base": "dense", "sparsity": 0.0, "pattern": "unstructured"}))
    assert top1_text(digits) == "97.00 ± 0.58 %" and top1_text(None) == "–"


def test_the_frontier_table_and_pareto_points_pair_speed_with_accuracy() -> None:
    setting = CombinedSetting(int8=True).settings()
    rows = [
        Row("digits-vit", "dense", top1=0.98),
        Row("digits-vit", "combined", setting, top1=0.97, top1_seeds=[0.96, 0.97, 0.98]),
        Row(SPEED_MODEL, "dense", macs=100, speed=[_entry("openvino", 1, 0.5), _entry("torch", 1, 0.2)]),
        Row(SPEED_MODEL, "combined", {**setting, "int8": "qdq"}, macs=40,
            speed=[_entry("openvino", 1, 1.6), _entry("openvino:bf16", 1, 1.8),
                   _entry("onnxruntime", 1, 1.1)]),
        Row(SPEED_MODEL, "combined", {**setting, "int8": "operator"}, macs=40,
            speed=[_entry("deepsparse", 1, 2.1)]),
    ]
    table = frontier_table(rows)
    header = ("| recipe | digits-vit top-1 | vs dense | fewer MACs | deepsparse b1 | onnxruntime b1 | "
              "openvino b1 |")
    assert header in table
    assert ("| vtp 0.2, heads 0.3, keep 0.7, 80 % zeros, int8 | 97.00 ± 0.58 % | -1.00 pt | 60.0 % | 2.10× | "
            "1.10× | 1.80× |") in table
    points = pareto_points(rows, batch=1)
    assert sorted((engine, x) for _, engine, x, _, _ in points) == [
        ("deepsparse", 2.1), ("onnxruntime", 1.1), ("openvino", 1.6), ("openvino:bf16", 1.8)]
    assert all(y == 0.97 and error == pytest.approx(0.00577, abs=1e-4) for *_, y, error in points)
    assert "| 97.00 ± 0.58 % | openvino:bf16, **1.80×** |" not in lead_table(rows)  # rows without entries


def test_without_digits_rows_there_is_nothing_to_plot() -> None:
    """--skip-accuracy with the combined rows: the frontier table still lists speeds, no Pareto plot."""
    setting = {**CombinedSetting(int8=True).settings(), "int8": "qdq"}
    rows = [Row(SPEED_MODEL, "dense", macs=100, speed=[_entry("openvino", 1, 0.5)]),
            Row(SPEED_MODEL, "combined", setting, macs=40, speed=[_entry("openvino", 1, 1.6)])]
    assert not has_pareto_points(rows)
    rows.insert(0, Row("digits-vit", "combined", CombinedSetting(int8=True).settings(), top1=0.97))
    assert has_pareto_points(rows)
