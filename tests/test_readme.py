"""README's examples and docs/methods.md's run as written; the quick start prunes, evaluates, serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vitsparse.compiler.export import ARTIFACT_FILES

pytestmark = pytest.mark.slow  # runs the README examples (training, engines)

README = Path(__file__).resolve().parents[1] / "README.md"
METHODS = README.parent / "docs" / "methods.md"  # the per-method examples, run after README's first


def _python_blocks() -> list[str]:
    """The README's python examples, then docs/methods.md's, in order."""
    return [block for path in (README, METHODS)
            for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = _python_blocks()
    assert blocks, "README has a Python API example"
    assert len(blocks[0].strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)  # the example writes its artifact folder here
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "block 5: 4 heads x 16" in out
    top1, directory = out.strip().splitlines()[-1].split()
    assert float(top1) >= 0.9
    assert sorted(p.name for p in (tmp_path / directory).iterdir()) == sorted(ARTIFACT_FILES)

    from vitsparse.compiler import Recipe, load_weights, replay  # the sentence after the example
    from vitsparse.models import build_model

    rebuilt = load_weights(replay(build_model("digits-vit"), Recipe.load("digits-75/recipe.json")),
                           "digits-75/weights.safetensors")
    sample = next(iter(namespace["data"].test))[0]
    assert torch.equal(rebuilt(sample), namespace["pruned"](sample))


def test_readme_second_order_and_gradual_examples_run(monkeypatch) -> None:
    blocks = _python_blocks()
    assert len(blocks) == 9, ("the API example, second-order pruning, gradual pruning, VTP, head channels, "
                              "token dropping fixed and learned, INT8, OpenVINO")
    namespace: dict = {}
    first = blocks[0].split("manager = PassManager")[0]  # imports, the dense model and the data
    from vitsparse.pruners import finetune as real_finetune

    def short_finetune(model, train, val=None, config=None, teacher=None, progress=True):  # keeps CI quick
        from dataclasses import replace

        return real_finetune(model, train, val, replace(config, max_steps=2), teacher, progress=False)

    exec(compile(first + "from vitsparse.compiler import PassManager\n", str(README), "exec"), namespace)
    exec(compile(blocks[1], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    sparsity = namespace["manager"].recipe.passes[-1].decisions["sparsity"]
    assert sparsity == pytest.approx(0.8, abs=1e-4)
    assert namespace["manager"].recipe.passes[-1].params["saliency"] == "obs-fisher"
    namespace["manager"] = namespace["PassManager"](namespace["trace"](namespace["dense"]))
    namespace["finetune"] = short_finetune
    exec(compile(blocks[2], str(README), "exec"), namespace)  # noqa: S102
    passes = namespace["manager"].recipe.passes
    assert [p.params["saliency"] for p in passes] == ["obs-layerwise"] * 4
    assert passes[-1].decisions["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_readme_vtp_example_runs() -> None:
    blocks = _python_blocks()
    namespace: dict = {}
    first = blocks[0].split("manager = PassManager")[0]
    imports = "from vitsparse.compiler import PassManager\nfrom vitsparse.pruners import finetune\n"
    exec(compile(first + imports, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    exec(compile(blocks[3], str(README), "exec"), namespace)  # noqa: S102
    passes = namespace["manager"].recipe.passes
    assert [p.name for p in passes] == ["vtp-gates", "vtp-slice"]
    assert passes[-1].stats["removed_fraction"] == pytest.approx(0.4, abs=0.05)
    from vitsparse.models import evaluate

    assert evaluate(namespace["sliced"], namespace["data"].test).top1 >= 0.95


def test_readme_head_channel_example_runs() -> None:
    namespace = _run_after_setup(4)
    passes = namespace["manager"].recipe.passes
    assert [p.name for p in passes] == ["head-channel-gates", "head-channel-slice"]
    assert 0.3 <= passes[-1].stats["attention_removed_fraction"] < 0.35
    from vitsparse.models import evaluate

    assert evaluate(namespace["sliced"], namespace["data"].test).top1 >= 0.95


def _run_after_setup(index: int) -> dict:
    """Run Python block `index` (README, then docs/methods.md) after the API example's setup."""
    blocks = _python_blocks()
    namespace: dict = {}
    first = blocks[0].split("manager = PassManager")[0]
    exec(compile(first + "from vitsparse.compiler import PassManager\n", str(README), "exec"), namespace)
    exec(compile(blocks[index], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_readme_token_drop_example_runs() -> None:
    namespace = _run_after_setup(5)
    record = namespace["manager"].recipe.passes[-1]
    assert record.name == "token-drop" and record.params["locations"] == [2, 4, 5]  # digits-vit: 6 blocks
    assert record.decisions["kept_tokens"] == [11, 8, 6]
    sample = next(iter(namespace["data"].test))[0]
    assert namespace["dropped"](sample).shape == (sample.shape[0], 10)


def test_readme_learned_token_drop_example_runs() -> None:
    namespace = _run_after_setup(6)
    record = namespace["manager"].recipe.passes[-1]
    assert record.params["mode"] == "learned" and len(record.params["thresholds"]) == 3
    assert abs(namespace["learned"].final_ratio - 0.65) < 0.1
    before, after = record.stats["before"]["macs"], record.stats["after"]["macs"]
    assert 0.2 < 1 - after / before < 0.5


def test_readme_int8_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its two artifact folders here
    namespace = _run_after_setup(7)
    record = namespace["manager"].recipe.passes[-1]
    assert record.name == "int8" and record.params["observer"] == "percentile"
    assert len(record.decisions["ranges"]) == 24  # qkv, proj, fc1, fc2 of digits-vit's 6 blocks
    for folder, form in (("int8-ort", "qdq"), ("int8-ds", "operator")):
        meta = json.loads((tmp_path / folder / "meta.json").read_text())
        assert meta["quantization"] == {"format": form, "layers": 24}


def test_readme_openvino_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # it runs the INT8 example's QDQ export
    namespace = _run_after_setup(7)
    blocks = _python_blocks()
    exec(compile(blocks[8], str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert capsys.readouterr().out.strip().splitlines()[-1] == "f32 qdq"
    assert namespace["logits"].shape == (1, 10)


def _quick_start() -> list[list[str]]:
    """The quick start's three commands, split into words."""
    text = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line.split() for line in block.strip().splitlines()]


def test_readme_quick_start_prunes_evaluates_and_serves(tmp_path, monkeypatch, capsys) -> None:
    import argparse

    from starlette.testclient import TestClient

    from vitsparse.bench.cli import main
    from vitsparse.models import build_model
    from vitsparse.models.digits import write_digits_imagefolder
    from vitsparse.runtime.artifact import load_artifact
    from vitsparse.runtime.serve_cli import configure_serve_parser, serve_config
    from vitsparse.runtime.server import ServerMetrics, build_models, create_app

    prune, evaluate, serve = _quick_start()
    assert [c[:2] for c in (prune, evaluate, serve)] == [["vitsparse", "prune"], ["vitsparse", "eval"],
                                                          ["vitsparse", "serve"]]
    build_model("digits-vit", pretrained=True, progress=False)
    write_digits_imagefolder(tmp_path / "my-images", per_class=26)  # the user's folder: digits as PNGs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    own_model = [w if w != "deit_small_patch16_224" else "digits-vit" for w in prune[1:]]
    assert main([*own_model, "--epochs", "1", "--skip-speed"]) == 0
    assert main(evaluate[1:]) == 0
    assert "same top-1 as PyTorch on" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    configure_serve_parser(parser)
    args = parser.parse_args(serve[2:])
    config, metrics = serve_config(args), ServerMetrics()
    models = build_models([load_artifact(a) for a in args.artifacts], config, metrics)
    app = create_app(models, config, metrics)
    image = next((tmp_path / "my-images" / "val" / "4").iterdir()).read_bytes()
    with TestClient(app) as client:
        reply = client.post("/v2/models/artifact/classify", content=image,
                            headers={"content-type": "image/png"})
    assert reply.status_code == 200 and reply.json()["predictions"][0]["label"] in [str(d) for d in range(10)]
