"""prune-and-bench end to end on a tiny model: rows, schema, artifacts, report files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from vitsparse.bench.accuracy import CALIBRATION_IMAGES
from vitsparse.bench.cli import main
from vitsparse.bench.combined import SPEED_RECIPE, CombinedSetting, seed_calibration
from vitsparse.bench.int8 import Int8SpeedSetting, parse_int8_speed_setting
from vitsparse.bench.methods import SpeedSetting, parse_speed_setting
from vitsparse.bench.report import (
    combined_setting_label,
    head_channel_table,
    markdown_report,
    paired_difference,
)
from vitsparse.bench.schema import Row, SpeedEntry
from vitsparse.bench.speed import MODELS_PER_GROUP, engine_name
from vitsparse.bench.staged import StagedSchedule
from vitsparse.bench.workflow import BenchOptions, available_engines, run_prune_and_bench
from vitsparse.compiler.export import ARTIFACT_FILES
from vitsparse.models import digits_loaders

SHORT_SCHEDULE = StagedSchedule(score_epochs=1, recover_epochs=1, threshold_epochs=1, token_epochs=1,
                                mask_steps=2, mask_recover_epochs=1, mask_epochs=1, qat_epochs=1)
STAGES = ["vtp", "head-channels", "token-drop", "masks"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    opts = BenchOptions(
        model="deit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 2},
        speed_settings=(SpeedSetting(0.9), SpeedSetting(0.5, "2:4"), SpeedSetting(0.5, "1x4")),
        accuracy_sparsities=(0.5,), vtp_rates=(0.4,), finetune_epochs=1, solver_timing_samples=8,
        head_channel_budgets=(0.3,), head_channel_variants=("full", "l1"), head_channel_seeds=2,
        token_drop_ratios=(0.65,), token_drop_seeds=1, token_drop_speed=(0.7,), int8_sparsities=(0.5,),
        int8_speed=(Int8SpeedSetting(None, "qdq"), Int8SpeedSetting(SpeedSetting(0.9))), batch_sizes=(1, 2),
        combined_frontier=(SPEED_RECIPE,), combined_seeds=2, combined_schedule=SHORT_SCHEDULE,
        seconds_per_block=0.05, rounds=1, num_cores=1, output_dir=tmp_path_factory.mktemp("runs"),
        progress=False,
    )
    return run_prune_and_bench(opts)


def test_results_follow_the_schema(run_dir: Path) -> None:
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["schema"] == 9 and doc["meta"]["profile"] == "default"
    assert doc["meta"]["speed_weights"] == "random (seed 0)"
    keys = {"model", "method", "settings", "top1", "top1_oneshot", "top1_sparse_trained", "top1_seeds",
            "macs", "attention_macs", "params", "nonzero_params", "prune_seconds", "calibration_samples",
            "artifact", "speed"}
    assert all(keys <= set(row) for row in doc["rows"])
    digits = [r for r in doc["rows"] if r["model"] == "digits-vit"]
    methods = ("magnitude", "obs-layerwise", "obs-fisher")
    assert [(r["method"], r["settings"]) for r in digits] == [("dense", {})] + [
        (m, {"sparsity": 0.5, "pattern": "unstructured"}) for m in methods] + [
        ("vtp", {"rate": 0.4, "multiple": 8})] + [
        ("head-channels", {"budget": 0.3, "variant": v}) for v in ("full", "l1")] + [
        ("token-drop", {"mode": "fixed", "target_ratio": 0.65, "keep_rate": 0.6115, "locations": [2, 4, 5],
                        "kept_tokens": [10, 6, 4]}),
        ("token-drop", {"mode": "learned", "target_ratio": 0.65, "locations": [2, 4, 5],
                        **{k: digits[8]["settings"][k] for k in ("keep_rate", "kept_tokens")}}),
        ("int8", {"base": "obs-fisher", "sparsity": 0.5, "pattern": "unstructured",
                  "observer": "percentile"})] + [
        (twin["method"], {**twin["settings"], "int8": "qat"}) for twin in (digits[4], digits[5], digits[7])
    ] + [
        ("combined", {"passes": ["vtp", "head-channels", "token-drop", "magnitude"], "vtp_rate": 0.2,
                      "head_budget": 0.3, "keep_rate": 0.7, "sparsity": 0.8, "multiple": 16}),
        ("combined", SPEED_RECIPE.settings())]
    assert all(0 <= r["top1"] <= 1 and 0 <= r["top1_oneshot"] <= 1 for r in digits)
    pruned = digits[1:7] + digits[9:12] + digits[13:]
    assert all(r["nonzero_params"] < digits[0]["nonzero_params"] for r in pruned)
    assert all(r["params"] == digits[0]["params"] for r in digits[7:9])  # token drop keeps every weight
    assert [r["calibration_samples"] for r in digits[1:]] == [
        None, 256, 256, None, 128, None, None, 256, 256, 256, 256, 256, None, None]
    vtp = digits[4]  # sliced: fewer MACs and parameters, all of them non-zero; three top-1 stages
    assert vtp["macs"] < 0.75 * digits[0]["macs"] and vtp["params"] < digits[0]["params"]
    assert 0 <= vtp["top1_sparse_trained"] <= 1 and all(r["top1_sparse_trained"] is None for r in digits[:4])
    for heads in digits[5:7]:  # 30 % fewer attention MACs, top-1 the mean over two seeds
        assert 0.3 <= 1 - heads["attention_macs"] / digits[0]["attention_macs"] < 0.35
        assert len(heads["top1_seeds"]) == 2 and heads["top1"] == pytest.approx(sum(heads["top1_seeds"]) / 2)
        assert 0 <= heads["top1_sparse_trained"] <= 1 and heads["params"] < digits[0]["params"]
        assert heads["prune_seconds"] > 0
    fixed, learned, int8, *twins, combined, combined_int8 = digits[7:]
    assert 0 <= combined_int8["top1"] <= 1 and combined_int8["macs"] < combined["macs"]
    assert combined_int8["settings"]["passes"][-1] == "int8" and combined_int8["settings"]["int8_patch_embed"]
    for row, stages in ((combined, STAGES), (combined_int8, [*STAGES, "int8"])):  # staged, over two seeds
        assert [s["stage"] for s in row["stages"]] == stages and len(row["top1_seeds"]) == 2
        assert row["top1"] == pytest.approx(sum(row["top1_seeds"]) / 2) == row["stages"][-1]["top1"]
        assert row["stages"][-1]["top1_seeds"] == row["top1_seeds"]
    assert [s["epochs"] for s in combined_int8["stages"]] == [2, 1, 2, 2, 1]
    assert 0.3 < 1 - fixed["macs"] / digits[0]["macs"] < 0.4  # about 35 % fewer MACs
    assert 0.2 < 1 - learned["macs"] / digits[0]["macs"] < 0.5  # near it after one epoch of learning
    assert len(fixed["top1_seeds"]) == len(learned["top1_seeds"]) == 1
    assert fixed["top1_sparse_trained"] is None and 0 < learned["top1_sparse_trained"] <= 1
    assert combined["macs"] < 0.5 * digits[0]["macs"]
    assert combined["nonzero_params"] < 0.3 * digits[0]["params"]
    # each format on every engine that runs it as INT8
    checked = {"qdq": "onnxruntime", "qdq-openvino": "openvino", "operator": "deepsparse"}
    assert set(int8["verification"]) == {f for f, e in checked.items() if e in available_engines()}
    for row in (int8, *twins):  # against the fake-quantized model: the engines' rounding differs, little more
        assert set(row["verification"]) == set(int8["verification"])
        for form, check in row["verification"].items():
            assert check["engine"] == checked[form] and check["images"] == 270
            assert 0 <= check["max_abs_logit_diff"] < 1 and 0.97 <= check["top1_agreement"] <= 1
    for twin, source in zip(twins, (digits[4], digits[5], fixed), strict=True):  # same shapes, now quantized
        assert twin["macs"] == source["macs"] and 0 <= twin["top1_oneshot"] <= 1 and 0 <= twin["top1"] <= 1
        assert Path(twin["artifact"], "model.onnx").is_file()


def test_each_solver_is_timed_on_the_speed_model(run_dir: Path) -> None:
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    timed = [r for r in rows if r["model"] != "digits-vit" and r["prune_seconds"] is not None]
    assert [(r["method"], r["calibration_samples"]) for r in timed] == [
        ("obs-layerwise", 8), ("obs-fisher", 8)]
    assert all(r["prune_seconds"] > 0 and not r["speed"] for r in timed)


def test_speed_rows_time_every_engine_against_the_dense_baseline(run_dir: Path) -> None:
    all_rows = json.loads((run_dir / "results.json").read_text())["rows"]
    rows = [r for r in all_rows if r["model"] != "digits-vit" and r["speed"]]
    deepsparse = "deepsparse" in available_engines()
    formats = ["qdq", "operator"] if deepsparse else ["qdq"]
    assert [(r["method"], r["settings"].get("pattern"), r["settings"].get("int8")) for r in rows] == [
        ("dense", None, None), ("magnitude", "unstructured", None), ("magnitude", "2:4", None),
        ("magnitude", "1x4", None), ("vtp", None, None), ("head-channels", None, None),
        ("token-drop", None, None), ("combined", None, None), ("int8", None, None)] + [
        ("int8", "unstructured", None)] * deepsparse + [
        (method, None, form) for method in ("vtp", "head-channels", "token-drop") for form in formats
        ] + [("combined", None, form) for form in formats]
    vtp, heads, tokens, combined, int8_qdq = rows[4:9]
    assert int8_qdq["settings"] == {"base": "dense", "format": "qdq"}
    twins = rows[9 + deepsparse:]
    if deepsparse:  # the operator format runs there only
        assert rows[9]["settings"] == {"base": "magnitude", "sparsity": 0.9, "pattern": "unstructured",
                                       "format": "operator"}
    for twin, original in zip(twins, [r for r in (vtp, heads, tokens) for _ in formats], strict=False):
        assert {k: v for k, v in twin["settings"].items() if k not in ("int8", "passes")} == {
            k: v for k, v in original["settings"].items() if k != "passes"}
        assert twin["macs"] == original["macs"]
    speed_recipe = twins[-1]
    assert speed_recipe["settings"] == {**SPEED_RECIPE.settings(), "int8": formats[-1]}
    assert speed_recipe["macs"] < combined["macs"]
    assert vtp["settings"] == {"rate": 0.4, "multiple": 8} and vtp["macs"] < rows[0]["macs"]
    assert heads["settings"] == {"budget": 0.3, "multiple": 8}
    assert 0.3 <= 1 - heads["attention_macs"] / rows[0]["attention_macs"] < 0.35
    assert tokens["settings"] == {"mode": "fixed", "keep_rate": 0.7, "locations": [1], "kept_tokens": [3]}
    assert tokens["macs"] < rows[0]["macs"] and combined["macs"] < tokens["macs"]
    assert rows[0]["top1"] is None
    int8_engines = {"qdq": {"onnxruntime", "openvino"}, "operator": {"deepsparse"}}  # where each runs as INT8
    for row in rows:
        settings = row["settings"]
        engines = (int8_engines[settings["format"]] if row["method"] == "int8" else
                   int8_engines[settings["int8"]] if "int8" in settings else available_engines())
        assert {(s["engine"], s["batch"]) for s in row["speed"]} == {
            (e, b) for e in available_engines() if engine_name(e) in engines for b in (1, 2)}
        for entry in row["speed"]:
            assert entry["items_per_sec"] > 0
            assert entry["latency_ms"]["p50"] <= entry["latency_ms"]["p99"]
            assert entry["speedup_vs_dense_torch"] > 0
            if engine_name(entry["engine"]) == "openvino":  # what its executed graph ran in INT8
                quantized = row["method"] == "int8" or "int8" in row["settings"]
                assert 0.5 < entry["int8_mac_share"] <= 1 if quantized else entry["int8_mac_share"] == 0
            else:
                assert entry["int8_mac_share"] is None
            if entry["engine"] == "deepsparse":  # token selection's TopK runs outside its kernels
                tokens = row["method"] in ("token-drop", "combined")
                assert entry["fraction_of_supported_ops"] >= 0.9 if tokens else entry[
                    "fraction_of_supported_ops"] == 1.0
    assert all(s["speedup_vs_dense_same_engine"] == 1.0 for s in rows[0]["speed"])


def test_every_speed_is_also_measured_against_the_best_dense_alternative(run_dir: Path) -> None:
    rows = [r for r in json.loads((run_dir / "results.json").read_text())["rows"] if r["speed"]]
    dense_int8 = next(r for r in rows if r["method"] == "int8" and r["settings"]["base"] == "dense")
    alternatives: dict[tuple[str, int], float] = {}  # ('openvino bf16', batch) -> its fastest latency
    for row, int8 in ((rows[0], False), (dense_int8, True)):
        for s in row["speed"]:
            if s["engine"] != "deepsparse":
                engine, _, precision = s["engine"].partition(":")  # 'openvino:bf16' where the CPU has bf16
                key = (f"{engine} {'int8' if int8 else precision or 'fp32'}", s["batch"])
                alternatives[key] = min(alternatives.get(key, float("inf")), s["latency_ms"]["p50"])
    others = [r for r in rows[1:] if r is not dense_int8]  # timed in groups beside their own baselines
    first_group = [rows[0], dense_int8, *others[:MODELS_PER_GROUP]]
    size = MODELS_PER_GROUP
    later_groups = [others[k:k + size] for k in range(size, len(others), size)]
    assert later_groups, "the run should be large enough to need a second timing group"
    for batch in (1, 2):
        name, fastest = min(((n, v) for (n, b), v in alternatives.items() if b == batch), key=lambda p: p[1])
        for row in first_group:
            for entry in (s for s in row["speed"] if s["batch"] == batch):
                assert entry["best_dense"] == name
                assert entry["speedup_vs_best_dense"] == pytest.approx(fastest / entry["latency_ms"]["p50"])
        for group in later_groups:  # one best-dense latency per group and batch, that group's own timing
            entries = [s for r in group for s in r["speed"] if s["batch"] == batch]
            assert {s["best_dense"] for s in entries} <= {n for n, _ in alternatives}
            best_latencies = [s["speedup_vs_best_dense"] * s["latency_ms"]["p50"] for s in entries]
            assert best_latencies == pytest.approx([best_latencies[0]] * len(entries))
    report = (run_dir / "report.md").read_text()
    assert "## Speed-up over the best dense alternative" in report
    assert "Best dense alternative: batch 1: **" in report
    assert "## Which engine accelerates which pattern" in report
    for pattern in ("unstructured", "N:M", "1×4", "structured", "tokens", "INT8", "combined",
                    "structured + INT8", "tokens + INT8", "combined + INT8"):
        assert f"\n| {pattern} | " in report


def test_every_row_keeps_its_artifact(run_dir: Path) -> None:
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    for row in rows:
        if row["model"] != "digits-vit" and not row["speed"]:  # a solver-timing row exports nothing
            assert row["artifact"] is None and row["prune_seconds"] > 0
        else:
            assert sorted(p.name for p in Path(row["artifact"]).iterdir()) == sorted(ARTIFACT_FILES)


def test_report_and_plot_are_written(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    assert "## Accuracy" in report and "## Speed" in report and "## Solver time" in report
    assert "magnitude(pattern=2:4, sparsity=0.5)" in report
    assert "| 50% | " in report  # the sparsity-by-method table
    assert "## Dimension slicing (VTP)" in report and "| digits-vit | multiple=8, rate=0.4 |" in report
    assert "## Head-equal channel removal" in report
    assert "| 30% | full | 3" in report and "| 30% | l1 | 3" in report
    assert "| vs l1, paired | seeds |" in report
    assert "## Token dropping (AS-ViT)" in report
    assert "| 0.65 | fixed | " in report and "| 0.65 | learned | " in report
    assert "## Combined recipes" in report and "| vtp 0.2, heads 0.3, keep 0.7, 80 % zeros | 7 | " in report
    assert "| vtp 0.4, heads 0.5, keep 0.4 at 1,4,7 fused, 90 % zeros, int8 + patch embed |" in report
    assert "## Static INT8 on digits-vit" in report and "| obs-fisher 50.00 % unstructured |" in report
    assert "| vtp multiple=8, rate=0.4 | " in report
    assert "| head-channels budget=0.3, variant=full | " in report
    assert "## INT8 speed" in report and "| dense | qdq | onnxruntime | 1 |" in report
    assert "| vtp multiple=8, rate=0.4 | qdq | openvino | 1 |" in report
    assert "## The frontier: accuracy against speed" in report
    assert "| vtp 0.4, heads 0.5, keep 0.4 at 1,4,7 fused, 90 % zeros, int8 + patch embed | " in report
    for plot in ("speedup.png", "accuracy.png", "head_channels.png", "pareto.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_bench_options_are_clear_errors(capsys) -> None:
    assert main(["prune-and-bench", "--methods", "pixie-dust"]) == 2
    assert "unknown methods ['pixie-dust']" in capsys.readouterr().err
    assert main(["prune-and-bench", "-e", "torch,tensorrt"]) == 2
    assert "unknown engine 'tensorrt'; choose from deepsparse, onnxruntime" in capsys.readouterr().err
    assert main(["prune-and-bench", "--sparsities", "1.5"]) == 2
    assert "sparsities must lie in [0, 1)" in capsys.readouterr().err
    assert main(["prune-and-bench", "--vtp-rates", "0.2,1"]) == 2
    assert "VTP rates must lie in [0, 1), got (0.2, 1.0)" in capsys.readouterr().err
    assert main(["prune-and-bench", "--head-channel-budgets", "1.2"]) == 2
    assert "head-channel budgets must lie in [0, 1), got (1.2,)" in capsys.readouterr().err
    assert main(["prune-and-bench", "--head-channel-budgets", "0.97", "--model", "deit_tiny_patch16_224",
                 "--set", "img_size=32"]) == 2
    assert "budget of 97% fewer attention MACs would empty heads" in capsys.readouterr().err
    assert main(["prune-and-bench", "--token-drop-ratios", "0.65,1.2"]) == 2
    assert "token-drop FLOPs ratios must lie in (0, 1], got 1.2" in capsys.readouterr().err
    assert main(["prune-and-bench", "--token-drop-modes", "guess"]) == 2
    assert "unknown token-drop mode 'guess'; choose from fixed, learned" in capsys.readouterr().err
    assert main(["prune-and-bench", "--token-drop-keep", "0"]) == 2
    assert "token-drop keep rates must lie in (0, 1], got (0.0,)" in capsys.readouterr().err
    assert main(["prune-and-bench", "--head-channel-variants", "full,magic"]) == 2
    assert "unknown head-channel variants ['magic']; choose from full, l1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune-and-bench", "--speed-settings", "0.75@2:4"])
    assert "fixes the sparsity at 0.5" in capsys.readouterr().err


def test_int8_speed_settings_parse() -> None:
    assert parse_int8_speed_setting("dense@qdq") == Int8SpeedSetting(None, "qdq")
    assert parse_int8_speed_setting("0.75@1x4") == Int8SpeedSetting(SpeedSetting(0.75, "1x4"), "operator")
    assert parse_int8_speed_setting("0.9@qdq") == Int8SpeedSetting(SpeedSetting(0.9), "qdq")
    with pytest.raises(ValueError, match="bad speed setting"):
        parse_int8_speed_setting("dense@int4")


@pytest.mark.parametrize("text,expected", [
    ("0.9", SpeedSetting(0.9)), ("2:4", SpeedSetting(0.5, "2:4")), ("0.75@1x4", SpeedSetting(0.75, "1x4")),
])
def test_speed_settings_parse(text: str, expected: SpeedSetting) -> None:
    assert parse_speed_setting(text) == expected


@pytest.mark.parametrize("text,message", [("1x4", "needs a sparsity|give a sparsity"), ("1.2", r"\[0, 1\)"),
                                          ("0.5@blocks", "unknown sparsity pattern")])
def test_bad_speed_settings_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_speed_setting(text)


def test_the_int8_recipe_drops_tokens_early_and_quantizes_the_patch_embedding() -> None:
    drop = SPEED_RECIPE.token_drop_pass(depth=6)  # blocks 1, 4, 7 of 12 land on 1, 2, 4 of 6
    assert drop.locations == (1, 2, 4) and drop.fuse and drop.keep_rate == 0.4
    assert CombinedSetting().token_drop_pass(depth=6).locations is None  # AS-ViT's, chosen by the pass
    assert "patch_embed" in SPEED_RECIPE.quant_config().targets
    assert "patch_embed" not in CombinedSetting(int8=True).quant_config().targets
    assert combined_setting_label(CombinedSetting(int8=True).settings()) == (
        "vtp 0.2, heads 0.3, keep 0.7, 80 % zeros, int8")
    no_vtp_no_drop = CombinedSetting(vtp_rate=0, keep_rate=1).settings()
    assert combined_setting_label(no_vtp_no_drop) == "heads 0.3, 80 % zeros"


def test_head_channel_table_pairs_each_variant_with_l1_seed_by_seed() -> None:
    def row(variant: str, seeds: list[float]) -> Row:
        return Row("digits-vit", "head-channels", {"budget": 0.3, "variant": variant},
                   top1=sum(seeds) / len(seeds), top1_seeds=seeds, attention_macs=70, macs=90)
    dense = Row("digits-vit", "dense", top1=0.98, attention_macs=100, macs=100)
    full, l1 = row("full", [0.99, 0.98, 0.97]), row("l1", [0.98, 0.98, 0.98])
    assert paired_difference(full, l1) == "+0.00 ± 0.58 pt"  # differences +1, 0, −1 points
    assert paired_difference(l1, l1) == "–" and paired_difference(full, None) == "–"
    assert paired_difference(full, row("l1", [0.98, 0.98])) == "–"  # not the same seeds
    table = head_channel_table([dense, full, l1])
    assert "| 30% | full | 30.00 % | 10.00 % |" in table
    assert "| 98.00 ± 0.58 % | +0.00 pt | +0.00 ± 0.58 pt | 3 |" in table
    assert "| 98.00 ± 0.00 % | +0.00 pt | – | 3 |" in table


def test_a_speed_only_report_has_no_empty_accuracy_table() -> None:
    timed = SpeedEntry("torch", 1, 10.0, {"p50": 100.0, "p99": 120.0}, 1.0, 1.0)
    rows = [Row("deit_small_patch16_224", "dense", speed=[timed])]
    meta = {"profile": "full", "date": "2026-12-02", "machine": "test", "cpu_cores": 2, "duration_s": 1.0}
    report = markdown_report(meta, rows)
    assert "## Speed" in report and "Every accuracy row" not in report
    with_accuracy = markdown_report(meta, [*rows, Row("digits-vit", "dense", top1=0.98)])
    assert "### Every accuracy row" in with_accuracy
    assert "| digits-vit | dense | – | 98.00 % |" in with_accuracy


def test_each_combined_seed_calibrates_on_its_own_draw() -> None:
    loaders = digits_loaders()
    draws = [seed_calibration(loaders, seed) for seed in (0, 1, 0)]
    assert draws[0].shape == (CALIBRATION_IMAGES, *loaders.train.dataset.tensors[0].shape[1:])
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    # seed 0 keeps the draw every seed shared before: the head of digits_loaders()'s shuffled order
    batches = itertools.islice(digits_loaders().train, -(-CALIBRATION_IMAGES // loaders.train.batch_size))
    assert torch.equal(draws[0], torch.cat([x for x, _ in batches])[:CALIBRATION_IMAGES])
