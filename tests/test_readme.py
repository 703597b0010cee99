"""README's examples run as written: the Python API example, and the quick start prunes, evaluates, serves."""

from __future__ import annotations

import pytest
import torch

from vitsparse.compiler.export import ARTIFACT_FILES

from doc_examples import ROOT, commands, run_python

pytestmark = pytest.mark.slow  # runs the README examples (training, engines)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its artifact folder here
    namespace = run_python("python-api")
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


def test_readme_quick_start_prunes_evaluates_and_serves(tmp_path, monkeypatch, capsys) -> None:
    import argparse

    from starlette.testclient import TestClient

    from vitsparse.bench.cli import main
    from vitsparse.models import build_model
    from vitsparse.models.digits import write_digits_imagefolder
    from vitsparse.runtime.artifact import load_artifact
    from vitsparse.runtime.serve_cli import configure_serve_parser, serve_config
    from vitsparse.runtime.server import ServerMetrics, build_models, create_app

    prune, evaluate, serve = commands("quick-start")
    assert [c[:2] for c in (prune, evaluate, serve)] == [["vitsparse", "prune"], ["vitsparse", "eval"],
                                                          ["vitsparse", "serve"]]
    build_model("digits-vit", pretrained=True, progress=False)
    write_digits_imagefolder(tmp_path / "my-images", per_class=26)  # the user's folder: digits as PNGs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
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
