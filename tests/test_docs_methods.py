"""The Python examples of the method pages (docs/methods/*.md) run as written, each after the README API
example's set-up, found by the name on its marker line: masks.md (masks-second-order, masks-gradual),
vtp.md (vtp), head-channels.md (head-channels), token-drop.md (token-drop-fixed, token-drop-learned),
int8.md (int8, int8-openvino) and sparse-kernels.md (sparse-kernels-export)."""

from __future__ import annotations

import json

import pytest

from vitsparse.runtime.kernel_crossover import default_min_sparsity

from doc_examples import example, run_python

pytestmark = pytest.mark.slow  # trains and quantizes digits-vit


def _setup() -> dict:
    """The README API example's imports, dense model and data (everything before its PassManager)."""
    setup = example("python-api").code.split("manager = PassManager")[0]
    namespace: dict = {}
    imports = "from vitsparse.compiler import PassManager\nfrom vitsparse.pruners import finetune\n"
    exec(compile(setup + imports, "python-api", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def _after_setup(name: str) -> dict:
    return run_python(name, _setup())


def test_second_order_and_gradual_examples_run() -> None:
    from vitsparse.pruners import finetune as real_finetune

    def short_finetune(model, train, val=None, config=None, teacher=None, progress=True):  # keeps CI quick
        from dataclasses import replace

        return real_finetune(model, train, val, replace(config, max_steps=2), teacher, progress=False)

    namespace = _after_setup("masks-second-order")
    sparsity = namespace["manager"].recipe.passes[-1].decisions["sparsity"]
    assert sparsity == pytest.approx(0.8, abs=1e-4)
    assert namespace["manager"].recipe.passes[-1].params["saliency"] == "obs-fisher"
    namespace["manager"] = namespace["PassManager"](namespace["trace"](namespace["dense"]))
    namespace["finetune"] = short_finetune
    run_python("masks-gradual", namespace)
    passes = namespace["manager"].recipe.passes
    assert [p.params["saliency"] for p in passes] == ["obs-layerwise"] * 4
    assert passes[-1].decisions["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_vtp_example_runs() -> None:
    namespace = _after_setup("vtp")
    passes = namespace["manager"].recipe.passes
    assert [p.name for p in passes] == ["vtp-gates", "vtp-slice"]
    assert passes[-1].stats["removed_fraction"] == pytest.approx(0.4, abs=0.05)
    from vitsparse.models import evaluate

    assert evaluate(namespace["sliced"], namespace["data"].test).top1 >= 0.95


def test_head_channel_example_runs() -> None:
    namespace = _after_setup("head-channels")
    passes = namespace["manager"].recipe.passes
    assert [p.name for p in passes] == ["head-channel-gates", "head-channel-slice"]
    assert 0.3 <= passes[-1].stats["attention_removed_fraction"] < 0.35
    from vitsparse.models import evaluate

    assert evaluate(namespace["sliced"], namespace["data"].test).top1 >= 0.95


def test_token_drop_example_runs() -> None:
    namespace = _after_setup("token-drop-fixed")
    record = namespace["manager"].recipe.passes[-1]
    assert record.name == "token-drop" and record.params["locations"] == [2, 4, 5]  # digits-vit: 6 blocks
    assert record.decisions["kept_tokens"] == [11, 8, 6]
    sample = next(iter(namespace["data"].test))[0]
    assert namespace["dropped"](sample).shape == (sample.shape[0], 10)


def test_learned_token_drop_example_runs() -> None:
    namespace = _after_setup("token-drop-learned")
    record = namespace["manager"].recipe.passes[-1]
    assert record.params["mode"] == "learned" and len(record.params["thresholds"]) == 3
    assert abs(namespace["learned"].final_ratio - 0.65) < 0.1
    before, after = record.stats["before"]["macs"], record.stats["after"]["macs"]
    assert 0.2 < 1 - after / before < 0.5


def test_int8_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its two artifact folders here
    namespace = _after_setup("int8")
    record = namespace["manager"].recipe.passes[-1]
    assert record.name == "int8" and record.params["observer"] == "percentile"
    assert len(record.decisions["ranges"]) == 24  # qkv, proj, fc1, fc2 of digits-vit's 6 blocks
    for folder, form in (("int8-ort", "qdq"), ("int8-ds", "operator")):
        meta = json.loads((tmp_path / folder / "meta.json").read_text())
        assert meta["quantization"] == {"format": form, "layers": 24}


def test_openvino_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # it runs the INT8 example's QDQ export
    namespace = _after_setup("int8")
    run_python("int8-openvino", namespace)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "f32 qdq"
    assert namespace["logits"].shape == (1, 10)


def test_sparse_kernel_example_runs(tmp_path, monkeypatch) -> None:
    import onnx

    monkeypatch.chdir(tmp_path)  # the example writes its artifact folder here
    namespace = _after_setup("sparse-kernels-export")
    expected = {"layers": 24, "min_sparsity": default_min_sparsity("f32"),
                "int8_min_sparsity": default_min_sparsity("int8"), "precision": "f32"}
    assert namespace["artifact"].meta["sparse_kernels"] == expected
    model = onnx.load(str(tmp_path / "int8-sparse" / "model.onnx"))
    kinds = sorted(n.op_type for n in model.graph.node if n.domain == "com.vitsparse")
    assert kinds == ["SparseLinear"] * 12 + ["SparseMLP"] * 6  # qkv, proj alone; fc1 and fc2 fused per block
