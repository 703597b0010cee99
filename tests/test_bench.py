"""prune-and-bench end to end on a tiny speed model: rows (found by method and settings), schema,
artifacts, report files."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from vitsparse.bench.accuracy import CALIBRATION_IMAGES
from vitsparse.bench.cli import main
from vitsparse.bench.combined import SPEED_RECIPE, CombinedSetting, seed_calibration
from vitsparse.bench.methods import SpeedSetting, parse_speed_setting
from vitsparse.bench.plan import RECIPES_DIR
from vitsparse.bench.report import (
    combined_setting_label,
    head_channel_table,
    markdown_report,
    paired_difference,
)
from vitsparse.bench.schema import Row, SpeedEntry
from vitsparse.bench.speed import MODELS_PER_GROUP, engine_name, kernel_thresholds
from vitsparse.bench.workflow import BenchOptions, available_engines, run_prune_and_bench
from vitsparse.compiler.export import ARTIFACT_FILES
from vitsparse.models import digits_loaders
from vitsparse.runtime.kernel_crossover import cpu_flags, cpu_model

STAGES = ["vtp", "head-channels", "token-drop", "masks"]


def short_recipe(name: str, directory: Path) -> Path:
    """A shipped combined recipe with every stage cut to one epoch (two mask steps)."""
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    path = directory / f"{name}.yaml"
    path.write_text(re.sub(r"epochs: \d+", "epochs: 1", text).replace("steps: 3", "steps: 2"))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The smallest run that touches every spec: each method once (INT8 twins where a method has them),
    a mask setting of each pattern, two head-channel variants and both token modes; each row over the
    default profile's seeds (two for head channels, one for the rest)."""
    recipes = tmp_path_factory.mktemp("recipes")
    combined, speed_recipe = (short_recipe(n, recipes) for n in ("combined", "combined-int8-speed"))
    opts = BenchOptions(
        only=("magnitude=0.5,2:4,0.5@1x4", "obs-layerwise=0.5", "obs-fisher=0.5", "vtp=0.4+int8",
              "heads=0.3:full+int8,0.3:l1", "tokens=0.6:fixed+int8,0.6:learned", "int8=0.5",
              f"combined={combined},{speed_recipe}"),
        model="deit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 2}, epochs=1,
        batch_sizes=(1, 2), seconds_per_block=0.05, rounds=1, num_cores=1,
        output_dir=tmp_path_factory.mktemp("runs"), quiet=True,
    )
    return run_prune_and_bench(opts)


def rows_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["rows"]


def find(rows: list[dict], model: str, method: str, **settings) -> dict:
    """The one row of `model` and `method` whose settings include `settings`."""
    found = [r for r in rows if r["model"] == model and r["method"] == method
             and all(r["settings"].get(k) == v for k, v in settings.items())]
    assert len(found) == 1, f"{len(found)} rows match {model} {method} {settings}"
    return found[0]


def digits(rows: list[dict], method: str, **settings) -> dict:
    return find(rows, "digits-vit", method, **settings)


def timed(rows: list[dict], method: str, **settings) -> dict:
    return find(rows, "deit_tiny_patch16_224", method, **settings)


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_results_follow_the_schema(run_dir: Path) -> None:
    doc = json.loads((run_dir / "results.json").read_text())
    meta = doc["meta"]
    assert doc["schema"] == 12 and meta["profile"] == "default" and meta["speed_weights"] == "random (seed 0)"
    assert meta["cpu_flags"] == list(cpu_flags()) and meta["cpu_model"] == cpu_model()
    assert 0 < meta["wall_s"] and 100 < meta["peak_rss_mb"] < 64 * 1024
    assert "vtp=0.2+int8" in meta["left_out"] and "vtp=0.4+int8" not in meta["left_out"]
    kernels = "openvino-sparse" in map(engine_name, meta["engines"])
    assert meta["sparse_kernel_thresholds"] == (kernel_thresholds() if kernels else None)
    keys = {"model", "method", "entry", "settings", "top1", "top1_oneshot", "top1_sparse_trained",
            "top1_seeds", "macs", "attention_macs", "params", "nonzero_params", "prune_seconds",
            "calibration_samples", "artifact", "speed"}
    rows = doc["rows"]
    assert all(keys <= set(row) for row in rows)
    dense = digits(rows, "dense")
    accuracy = [r for r in rows if r["model"] == "digits-vit"]
    assert len(accuracy) == 1 + 5 + 2 + 3 + 3 + 1 + 2  # dense, masks, vtp + twin, heads, tokens, int8, ...
    assert all(0 <= r["top1"] <= 1 and 0 <= r["top1_oneshot"] <= 1 for r in accuracy)
    for method, settings in (("magnitude", {"sparsity": 0.5, "pattern": "unstructured"}),
                             ("obs-layerwise", {"sparsity": 0.5, "pattern": "unstructured"}),
                             ("obs-fisher", {"sparsity": 0.5, "pattern": "unstructured"})):
        row = digits(rows, method, **settings)
        assert row["nonzero_params"] < dense["nonzero_params"] and row["entry"] == f"{method}=0.5"
        assert row["calibration_samples"] == (None if method == "magnitude" else CALIBRATION_IMAGES)
    vtp = digits(rows, "vtp", rate=0.4, int8=None)  # sliced: fewer MACs and parameters; three top-1 stages
    assert vtp["macs"] < 0.75 * dense["macs"] and vtp["params"] < dense["params"]
    assert vtp["entry"] == "vtp=0.4"
    assert 0 <= vtp["top1_sparse_trained"] <= 1 and dense["top1_sparse_trained"] is None
    for variant in ("full", "l1"):  # 30 % fewer attention MACs, top-1 the mean over two seeds
        heads = digits(rows, "head-channels", variant=variant, int8=None)
        assert 0.3 <= 1 - heads["attention_macs"] / dense["attention_macs"] < 0.35
        assert len(heads["top1_seeds"]) == 2 and heads["top1"] == pytest.approx(sum(heads["top1_seeds"]) / 2)
        assert 0 <= heads["top1_sparse_trained"] <= 1 and heads["params"] < dense["params"]
        assert heads["prune_seconds"] > 0
    fixed, learned = (digits(rows, "token-drop", mode=m, int8=None) for m in ("fixed", "learned"))
    assert 0.3 < 1 - fixed["macs"] / dense["macs"] < 0.4  # keep 0.6: about 35 % fewer MACs
    assert 0.2 < 1 - learned["macs"] / dense["macs"] < 0.5  # near it after one epoch of learning
    assert fixed["settings"]["target_ratio"] == learned["settings"]["target_ratio"] == 0.6577
    assert fixed["top1_sparse_trained"] is None and 0 < learned["top1_sparse_trained"] <= 1
    assert fixed["params"] == dense["params"]  # token drop keeps every weight
    combined = digits(rows, "combined", passes=STAGES[:3] + ["magnitude"])
    combined_int8 = digits(rows, "combined", passes=STAGES[:3] + ["magnitude", "int8"])
    assert 0 <= combined_int8["top1"] <= 1 and combined_int8["macs"] < combined["macs"]
    assert combined_int8["settings"]["int8_patch_embed"]
    for row, stages in ((combined, STAGES), (combined_int8, [*STAGES, "int8"])):  # staged, one seed
        assert [s["stage"] for s in row["stages"]] == stages and len(row["top1_seeds"]) == 1
        assert row["top1"] == row["top1_seeds"][0] == row["stages"][-1]["top1"]
        assert row["stages"][-1]["top1_seeds"] == row["top1_seeds"]
    assert [s["epochs"] for s in combined_int8["stages"]] == [2, 1, 2, 2, 1]
    assert combined["macs"] < 0.5 * dense["macs"] and combined["nonzero_params"] < 0.3 * dense["params"]


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_int8_rows_and_twins_run_on_every_engine_that_takes_their_format(run_dir: Path) -> None:
    rows = rows_of(run_dir)
    int8 = digits(rows, "int8", sparsity=0.5)
    assert int8["settings"] == {"base": "obs-fisher", "sparsity": 0.5, "pattern": "unstructured",
                                "observer": "percentile"}
    checked = {"qdq": "onnxruntime", "qdq-openvino": "openvino", "operator": "deepsparse",
               "sparse-kernels": "openvino-sparse"}
    assert set(int8["verification"]) == {f for f, e in checked.items() if e in available_engines()}
    sources = [digits(rows, "vtp", rate=0.4, int8=None),
               digits(rows, "head-channels", variant="full", int8=None),
               digits(rows, "token-drop", mode="fixed", int8=None)]
    twins = [digits(rows, r["method"], **{**r["settings"], "int8": "qat"}) for r in sources]
    for row in (int8, *twins):  # against the fake-quantized model: the engines' rounding differs, little more
        assert set(row["verification"]) == set(int8["verification"])
        for form, check in row["verification"].items():
            assert check["engine"] == checked[form] and check["images"] == 270
            assert 0 <= check["max_abs_logit_diff"] < 1 and 0.97 <= check["top1_agreement"] <= 1
    for twin, source in zip(twins, sources, strict=True):  # same shapes, now quantized
        assert twin["macs"] == source["macs"] and 0 <= twin["top1_oneshot"] <= 1 and 0 <= twin["top1"] <= 1
        assert twin["entry"] == source["entry"] + "+int8"
        assert Path(twin["artifact"], "model.onnx").is_file()


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_each_solver_is_timed_on_the_speed_model(run_dir: Path) -> None:
    rows = rows_of(run_dir)
    for method in ("obs-layerwise", "obs-fisher"):
        row = timed(rows, method)
        assert row["prune_seconds"] > 0 and row["calibration_samples"] == 64 and row["speed"]
    assert timed(rows, "magnitude", sparsity=0.5, pattern="unstructured")["prune_seconds"] is None


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_speed_rows_time_every_engine_against_the_dense_baseline(run_dir: Path) -> None:
    rows = [r for r in rows_of(run_dir) if r["model"] != "digits-vit"]
    engines = json.loads((run_dir / "results.json").read_text())["meta"]["engines"]
    assert engines == list(available_engines(extra_columns=False))  # the default profile's
    deepsparse = "deepsparse" in engines
    formats = ["qdq", "operator"] if deepsparse else ["qdq"]
    dense, dense_int8 = rows[:2]  # the baselines lead
    assert (dense["method"], dense_int8["method"], dense_int8["settings"]) == (
        "dense", "int8", {"base": "dense", "format": "qdq"})
    vtp, heads = timed(rows, "vtp", int8=None), timed(rows, "head-channels", int8=None)
    tokens = timed(rows, "token-drop", int8=None)  # the learned entry times the same graph: one row
    combined = timed(rows, "combined", int8=None)
    for original in (vtp, heads, tokens):
        for form in formats:
            twin = timed(rows, original["method"], **{**original["settings"], "int8": form})
            assert twin["macs"] == original["macs"] and twin["entry"] == original["entry"] + "+int8"
    assert [timed(rows, "int8", base="magnitude", format=f)["settings"]["sparsity"] for f in formats] == [
        0.5] * len(formats)
    speed_recipe = timed(rows, "combined", int8=formats[-1])
    assert speed_recipe["settings"] == {**SPEED_RECIPE.settings(), "int8": formats[-1]}
    assert speed_recipe["macs"] < combined["macs"]
    assert vtp["settings"] == {"rate": 0.4, "multiple": 8} and vtp["macs"] < dense["macs"]
    assert heads["settings"] == {"budget": 0.3, "multiple": 8}
    assert 0.3 <= 1 - heads["attention_macs"] / dense["attention_macs"] < 0.35
    assert tokens["settings"] == {"mode": "fixed", "keep_rate": 0.6, "locations": [1], "kept_tokens": [2]}
    assert tokens["macs"] < dense["macs"] and combined["macs"] < tokens["macs"]
    assert dense["top1"] is None
    int8_engines = {"qdq": {"onnxruntime", "openvino"}, "operator": {"deepsparse"}}  # where each runs as INT8
    for row in rows:
        settings = row["settings"]
        runs_on = (int8_engines[settings["format"]] if row["method"] == "int8" else
                   int8_engines[settings["int8"]] if "int8" in settings else set(map(engine_name, engines)))
        assert {(s["engine"], s["batch"]) for s in row["speed"]} == {
            (e, b) for e in engines if engine_name(e) in runs_on for b in (1, 2)}
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
    assert all(s["speedup_vs_dense_same_engine"] == 1.0 for s in dense["speed"])


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_every_speed_is_also_measured_against_the_best_dense_alternative(run_dir: Path) -> None:
    rows = [r for r in rows_of(run_dir) if r["speed"]]
    dense, dense_int8 = rows[:2]
    alternatives: dict[tuple[str, int], float] = {}  # ('openvino bf16', batch) -> its fastest latency
    for row, int8 in ((dense, False), (dense_int8, True)):
        for s in row["speed"]:
            if s["engine"] != "deepsparse":
                engine, _, precision = s["engine"].partition(":")  # 'openvino:bf16' where the CPU has bf16
                key = (f"{engine} {'int8' if int8 else precision or 'fp32'}", s["batch"])
                alternatives[key] = min(alternatives.get(key, float("inf")), s["latency_ms"]["p50"])
    others = rows[2:]  # timed in groups beside their own baselines
    first_group = [dense, dense_int8, *others[:MODELS_PER_GROUP]]
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
    assert "Best dense alternative: batch 1: **" in report
    assert "## Which engine accelerates which pattern" in report
    for pattern in ("unstructured", "N:M", "1×4", "structured", "tokens", "INT8", "combined",
                    "structured + INT8", "tokens + INT8", "combined + INT8"):
        assert f"\n| {pattern} | " in report


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_every_row_keeps_its_artifact(run_dir: Path) -> None:
    for row in rows_of(run_dir):
        assert sorted(p.name for p in Path(row["artifact"]).iterdir()) == sorted(ARTIFACT_FILES)


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_report_leads_with_one_line_per_setting(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    lead = report[report.index("## Summary"):report.index("\n## ", report.index("## Summary") + 1)]
    rows = rows_of(run_dir)
    entries = list(dict.fromkeys(r["entry"] for r in rows if r["speed"] and r["entry"]))
    assert [line.split(" | ")[0] for line in lead.splitlines() if line.startswith("| `")] == [
        f"| `{e}`" for e in entries]
    vtp = digits(rows, "vtp", rate=0.4, int8=None)
    speedup = r"\S+, [\d.]+×, \*\*[\d.]+×\*\*"
    assert re.search(rf"\| `vtp=0.4` \| {speedup} \| {speedup} \| {100 * vtp['top1']:.2f} % \|", lead)
    assert "## Left out" in report and "`vtp=0.2+int8`" in report


@pytest.mark.slow  # the end-to-end run: digits-vit rows trained, every engine timed
def test_report_and_plot_are_written(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    assert "## Masks on digits-vit" in report and "## Speed" in report and "## Solver time" in report
    assert "magnitude(pattern=2:4, sparsity=0.5)" in report
    assert "| 50% | " in report  # the sparsity-by-method table
    assert "## Dimension slicing (VTP)" in report and "| digits-vit | multiple=8, rate=0.4 |" in report
    assert "## Head-equal channel removal" in report
    assert "| 30% | full | 3" in report and "| 30% | l1 | 3" in report
    assert "| vs l1, paired | seeds |" in report
    assert "## Token dropping (AS-ViT)" in report
    assert "| 0.66 | fixed | " in report and "| 0.66 | learned | " in report
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


@pytest.mark.parametrize("args, message", [
    (["--only", "pixie-dust"], "unknown method 'pixie-dust'; choose from magnitude, obs-layerwise"),
    (["--skip", "pixie-dust"], "unknown method 'pixie-dust'"),
    (["-e", "torch,tensorrt"], "unknown engine 'tensorrt'; choose from deepsparse, onnxruntime"),
    (["--only", "magnitude=1.5"], "bad magnitude setting '1.5' .*sparsity must lie in"),
    (["--only", "vtp=0.2,1"], r"bad vtp setting '1' \(write e.g. vtp=0.4; RATE\[:MULTIPLE\]\[\+int8\]\)"),
    (["--only", "heads=0.97", "--model", "deit_tiny_patch16_224", "--set", "img_size=32", "-e", "torch"],
     "budget of 97% fewer attention MACs would empty heads"),  # before the digits-vit rows
    (["--only", "tokens=1.2"], r"bad tokens setting '1.2'.*must lie in \[0, 1\]"),
    (["--only", "tokens=0.6:guess"], "unknown 'guess'; choose from fixed, learned"),
    (["--only", "heads=0.3:magic"], "unknown 'magic'; choose from full, l1"),
    (["--only", "magnitude=0.75@2:4"], "fixes the sparsity at 0.5"),
    (["--seeds", "0"], "seeds must be >= 1, got 0"),
])
def test_bad_bench_options_are_clear_errors(capsys, args, message) -> None:
    assert main(["prune-and-bench", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_help_fits_one_screen(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["prune-and-bench", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 45
    assert "heads=BUDGET[:VARIANT][+int8]" in text and "combined=RECIPE_FILE[+int8]" in text


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
    meta = {"profile": "full", "date": "2026-12-02", "machine": "test", "cpu_cores": 2, "wall_s": 1.0,
            "peak_rss_mb": 900.0, "speed_model": "deit_small_patch16_224", "speed_weights": "random (seed 0)"}
    report = markdown_report(meta, rows)
    assert "## Speed" in report and "Every accuracy row" not in report
    with_accuracy = markdown_report(meta, [*rows, Row("digits-vit", "dense", top1=0.98)])
    assert "## Every accuracy row" in with_accuracy
    assert "| digits-vit | dense | – | 98.00 % |" in with_accuracy


def test_the_report_says_which_models_openvino_sparse_times() -> None:
    timed = SpeedEntry("openvino", 1, 10.0, {"p50": 100.0, "p99": 120.0}, 1.0, 1.0)
    rows = [Row("deit_small_patch16_224", "dense", speed=[timed])]
    meta = {"profile": "full", "date": "2026-12-06", "machine": "test", "cpu_cores": 2, "wall_s": 1.0,
            "peak_rss_mb": 900.0, "speed_model": "deit_small_patch16_224", "speed_weights": "random (seed 0)"}
    assert "sparse-kernel threshold" not in markdown_report({**meta, "sparse_kernel_thresholds": None}, rows)
    report = markdown_report({**meta, "sparse_kernel_thresholds": {"int8": 0.85, "f32": 0.75}}, rows)
    assert ("openvino-sparse times a model only where a layer reaches this CPU's sparse-kernel threshold "
            "(85% all-zero 1×4 blocks in INT8, 75% zeros in f32)") in report


def test_the_report_names_the_cpu_its_speeds_belong_to() -> None:
    timed = SpeedEntry("openvino", 1, 10.0, {"p50": 100.0, "p99": 120.0}, 1.0, 1.0)
    rows = [Row("deit_small_patch16_224", "dense", speed=[timed])]
    meta = {"profile": "full", "date": "2026-12-07", "machine": "vm x86_64", "cpu_cores": 2, "wall_s": 1.0,
            "peak_rss_mb": 900.0, "speed_model": "deit_small_patch16_224", "speed_weights": "random (seed 0)"}
    cpu = {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "half_width_avx512"]}
    report = markdown_report({**meta, **cpu}, rows)
    assert "on vm x86_64 (2 cores; AMD EPYC; flags avx2 avx512f half_width_avx512), 1 s" in report
    assert "on vm x86_64 (2 cores), 1 s" in markdown_report({**meta, "cpu_model": "", "cpu_flags": []}, rows)


def test_each_combined_seed_calibrates_on_its_own_draw() -> None:
    loaders = digits_loaders()
    draws = [seed_calibration(loaders, seed) for seed in (0, 1, 0)]
    assert draws[0].shape == (CALIBRATION_IMAGES, *loaders.train.dataset.tensors[0].shape[1:])
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    # seed 0 keeps the draw every seed shared before: the head of digits_loaders()'s shuffled order
    batches = itertools.islice(digits_loaders().train, -(-CALIBRATION_IMAGES // loaders.train.batch_size))
    assert torch.equal(draws[0], torch.cat([x for x, _ in batches])[:CALIBRATION_IMAGES])


def test_a_run_that_cannot_fit_its_artifacts_stops_before_any_work(monkeypatch, tmp_path, capsys) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**8, 10**8))
    args = ["prune-and-bench", "--only", "vtp=0.4", "-o", str(tmp_path / "runs")]
    assert main(args) == 2
    # DeiT-S: 22 M parameters × 8 bytes × 1.5, at 2 batch sizes, for VTP and the two baselines
    assert re.search(r"the artifacts need about 1\.6 GB in .*runs, 0\.1 GB is free", capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
