"""Each prune-and-bench method spec on a small fake context (a tiny random ViT, a handful of digits), and a
method-shaped test double that joins prune-and-bench through one registry line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, Subset

from vitsparse.bench.profiles import DEFAULT, FULL
from vitsparse.bench.registry import SPECS, get_spec, registered
from vitsparse.bench.schema import Row
from vitsparse.bench.spec import DigitsContext, Entry, MethodSpec, SpeedContext
from vitsparse.bench.workflow import BenchOptions, resolve_entries, run_prune_and_bench
from vitsparse.compiler import PassManager, Recipe, trace
from vitsparse.compiler.trace import example_input
from vitsparse.models import DigitsLoaders, digits_datasets

from helpers import small_vit

pytestmark = pytest.mark.slow  # trains (one epoch on 72 images) and exports every spec's rows


def tiny_digits_vit() -> torch.nn.Module:
    """digits-vit's shape (8x8 grey images, head width 16) at depth 2, random weights."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                             num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0).eval()


def handful(dataset, count: int, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


@pytest.fixture(scope="module")
def digits_ctx(tmp_path_factory) -> DigitsContext:
    data = digits_datasets()
    loaders = DigitsLoaders(train=handful(data.train, 72, shuffle=True), val=handful(data.val, 16),
                            test=handful(data.test, 16), mean=data.mean, std=data.std)
    return DigitsContext(dense=tiny_digits_vit(), loaders=loaders, artifacts=tmp_path_factory.mktemp("art"),
                         epochs=1, long_epochs=1, seeds=2, model="tiny-digits")


@pytest.fixture(scope="module")
def speed_ctx() -> SpeedContext:
    model = small_vit(depth=2)
    images = example_input(trace(model), 8)
    return SpeedContext(model=model, model_name="tiny-deit", base={"model": "deit_tiny_patch16_224"},
                        calibration=images, calibration_samples=8, int8_calibration=images,
                        int8_formats=("qdq", "operator"))


def _dense_costs(model: torch.nn.Module):
    return PassManager(trace(model)).costs


@pytest.mark.parametrize("text, method, settings", [
    ("magnitude=0.75@1x4", "magnitude", {"sparsity": 0.75, "pattern": "1x4"}),
    ("obs-fisher=0.5", "obs-fisher", {"sparsity": 0.5, "pattern": "unstructured"}),
    ("vtp=0.4:16", "vtp", {"rate": 0.4, "multiple": 16}),
    ("heads=0.3:l1", "head-channels", {"budget": 0.3, "variant": "l1"}),
    ("int8=0.75", "int8", {"base": "obs-fisher", "sparsity": 0.75, "pattern": "unstructured",
                           "observer": "percentile"}),
])
def test_a_spec_makes_its_digits_row_on_a_fake_context(digits_ctx, text, method, settings) -> None:
    name, _, setting = text.partition("=")
    spec = get_spec(name)
    rows = spec.digits_rows(spec.parse(setting), digits_ctx)
    assert [(r.model, r.method, r.settings) for r in rows] == [("tiny-digits", method, settings)]
    row, dense = rows[0], _dense_costs(digits_ctx.dense)
    assert 0 <= row.top1 <= 1 and 0 <= row.top1_oneshot <= 1
    assert row.nonzero_params < dense.nonzero_params
    assert (Path(row.artifact) / "model.onnx").exists()
    if name == "heads":  # averaged over the context's seeds
        assert len(row.top1_seeds) == digits_ctx.seeds


def test_the_token_spec_aims_digits_at_the_flops_its_keep_rate_gives(digits_ctx) -> None:
    spec = get_spec("tokens")
    row = spec.digits_rows(spec.parse("0.6:fixed"), digits_ctx)[0]
    dense = _dense_costs(digits_ctx.dense)
    assert row.method == "token-drop" and row.settings["mode"] == "fixed"
    assert row.settings["target_ratio"] == pytest.approx(row.macs / dense.macs, abs=0.03)
    assert row.params == dense.params  # dropping tokens keeps every weight


def test_int8_suffix_adds_the_quantization_aware_twin(digits_ctx) -> None:
    spec = get_spec("vtp")
    rows = spec.digits_rows(spec.parse("0.4+int8"), digits_ctx)
    assert [r.settings.get("int8") for r in rows] == [None, "qat"]
    assert rows[1].verification and all(0 <= c["top1_agreement"] <= 1 for c in rows[1].verification.values())


def test_the_combined_spec_trains_a_recipe_file_stage_by_stage(digits_ctx, tmp_path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("stages:\n  - vtp-scores: {epochs: 1}\n  - vtp-slice: {rate: 0.2, multiple: 16}\n"
                      "  - finetune: {epochs: 1}\n  - sparsity: {saliency: obs-fisher, sparsity: 0.5, "
                      "scope: global, solver: {block_size: 16}, steps: 1, epochs: 1}\n"
                      "  - finetune: {epochs: 1}\n")
    spec = get_spec("combined")
    rows = spec.digits_rows(spec.parse(str(recipe)), digits_ctx)
    assert [s["stage"] for s in rows[0].stages] == ["vtp", "masks"]
    assert rows[0].settings["passes"] == ["vtp", "magnitude"] and len(rows[0].top1_seeds) == 2
    assert rows[0].top1 == pytest.approx(sum(rows[0].top1_seeds) / 2) == rows[0].stages[-1]["top1"]
    assert rows[0].stages[-1]["top1_seeds"] == rows[0].top1_seeds


@pytest.mark.parametrize("text, rows_timed", [
    ("magnitude=0.9", [("magnitude", None)]),
    ("vtp=0.4+int8", [("vtp", None), ("vtp", "qdq"), ("vtp", "operator")]),
    ("heads=0.3", [("head-channels", None)]),
    ("tokens=0.7", [("token-drop", None)]),
    ("int8=dense", [("int8", None)]),  # the QDQ form is the workflow's baseline
    ("combined=combined+int8", [("combined", "qdq"), ("combined", "operator")]),
])
def test_a_spec_makes_its_speed_graphs_on_a_fake_context(speed_ctx, text, rows_timed) -> None:
    name, _, setting = text.partition("=")
    candidates = get_spec(name).speed_candidates(get_spec(name).parse(setting), speed_ctx)
    assert [(c.row.method, c.row.settings.get("int8")) for c in candidates] == rows_timed
    dense = _dense_costs(speed_ctx.model)
    for candidate in candidates:
        assert candidate.row.model == "tiny-deit"
        assert (candidate.row.macs, candidate.row.nonzero_params) != (dense.macs, dense.nonzero_params) \
            or candidate.engines  # an INT8 model of dense weights differs in where it runs
        out = candidate.graph(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, text", [("vtp", "1.2"), ("vtp", "0.4:x"), ("heads", "0.3:nope"),
                                        ("tokens", "0"), ("tokens", "0.7:sometimes"), ("magnitude", "lots"),
                                        ("combined", "no-such-recipe"), ("int8", "0.5@3x3")])
def test_a_bad_setting_names_the_syntax(name, text) -> None:
    spec = get_spec(name)
    with pytest.raises(ValueError, match=f"bad {name} setting .*{name}={spec.example}"):
        spec.parse(text)


def test_every_profile_entry_parses_and_the_default_has_every_method() -> None:
    for profile in (DEFAULT, FULL):
        for entry in profile.entries:
            get_spec(entry.method).parse(entry.setting)
    assert {e.method for e in DEFAULT.entries} == set(SPECS)
    assert {e.method for e in FULL.entries} == set(SPECS)


def test_only_and_skip_pick_entries() -> None:
    assert resolve_entries(DEFAULT, only=("vtp=0.2,0.3",)) == [Entry("vtp", "0.2"), Entry("vtp", "0.3")]
    assert resolve_entries(DEFAULT, only=("vtp",)) == [e for e in DEFAULT.entries if e.method == "vtp"]
    assert resolve_entries(DEFAULT, only=("none",)) == []
    assert all(e.method != "combined" for e in resolve_entries(DEFAULT, skip=("combined",)))
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        resolve_entries(DEFAULT, skip=("fast",))


class HalveSpec(MethodSpec):
    """A method-shaped double: halves every weight (digits-vit) or nothing (speed), and writes a section."""

    name = "halve"
    example = "0.5"
    summary = "FACTOR"

    def parse(self, text: str) -> float:
        return float(text)

    def digits_rows(self, setting: float, ctx: DigitsContext) -> list[Row]:
        from vitsparse.bench.accuracy import make_row
        from vitsparse.models import evaluate

        manager = PassManager(trace(ctx.dense), recipe=Recipe(base=ctx.base))
        with torch.no_grad():
            for parameter in manager.graph_module.parameters():
                parameter.mul_(setting)
        top1 = evaluate(manager.graph_module, ctx.loaders.test).top1
        return [make_row(self.name, {"factor": setting}, manager.graph_module, top1, top1, model=ctx.model)]

    def speed_candidates(self, setting: float, ctx: SpeedContext):
        manager = PassManager(trace(ctx.model), recipe=Recipe(base=ctx.base))
        return [ctx.candidate(self.name, {"factor": setting}, manager)]

    def report_section(self, rows: list[Row], meta: dict) -> str:
        mine = [f"{r.model}: {r.settings['factor']}" for r in rows if r.method == self.name]
        return "## Halving\n\n" + ", ".join(mine) if mine else ""


def test_a_method_joins_prune_and_bench_through_one_registry_line(tmp_path) -> None:
    with registered(HalveSpec()):
        run_dir = run_prune_and_bench(BenchOptions(
            only=("halve=0.5",), model="deit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1},
            engines=("torch",), batch_sizes=(1,), seconds_per_block=0.02, rounds=1, output_dir=tmp_path,
            quiet=True))
    assert "halve" not in SPECS
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    mine = {(r["model"], r["method"], r["entry"]) for r in rows if r["method"] == "halve"}
    assert mine == {("digits-vit", "halve", "halve=0.5"), ("deit_tiny_patch16_224", "halve", "halve=0.5")}
    report = (run_dir / "report.md").read_text()
    assert "## Halving\n\ndigits-vit: 0.5, deit_tiny_patch16_224: 0.5" in report
    assert "| `halve=0.5` | torch, " in report  # the lead table
