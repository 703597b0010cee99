"""`vitsparse eval`: an exported model's accuracy over an image folder, through the server's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vitsparse.bench.cli import main
from vitsparse.compiler import ExportConfig, Recipe, export_artifact, trace
from vitsparse.models import build_model
from vitsparse.runtime import ENGINES, engine_status
from vitsparse.runtime.__main__ import main as runtime_main

pytestmark = pytest.mark.slow  # trained digits-vit on every engine

AVAILABLE = [name for name in ENGINES if engine_status(name).available]


def digits_folder(root: Path, per_class: int = 12) -> Path:
    """An ImageFolder of scikit-learn digits as 8x8 PNGs (what the pixels are: 0-16 scaled to 0-255)."""
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        rows = np.flatnonzero(digits.target == label)[-per_class:]  # the end of the set, mostly unseen
        for row in rows:
            pixels = np.round(digits.images[row] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"{row}.png")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    model = build_model("digits-vit", pretrained=True, progress=False)
    target = tmp_path_factory.mktemp("eval") / "digits"
    return export_artifact(trace(model), Recipe(base={"model": "digits-vit"}), target,
                           ExportConfig(dynamic_batch=True)).directory


@pytest.mark.parametrize("engine", AVAILABLE)
def test_eval_measures_the_served_top1_and_agrees_with_pytorch(exported, tmp_path, engine, capsys) -> None:
    folder = digits_folder(tmp_path / "images")
    report = tmp_path / "r.json"
    assert main(["eval", str(exported), "--data", str(folder), "-e", engine, "-x", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 120 and result["skipped"] == 0
    assert result["top1"] > 0.9 and result["top5"] >= result["top1"]
    assert result["agreement_with_pytorch"] >= 0.995
    assert "same top-1 as PyTorch" in capsys.readouterr().out


def test_the_runtime_only_command_runs_without_the_pytorch_reference(exported, tmp_path, capsys) -> None:
    folder = digits_folder(tmp_path / "images", per_class=2)
    (folder / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert runtime_main(["eval", str(exported), "--data", str(folder), "-e", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "over 20 images (1 skipped: not decodable)" in out and "PyTorch" not in out


@pytest.mark.parametrize("layout, message", [
    (lambda root: None, "image folder not found"),
    (lambda root: root.mkdir(), "holds no class folders"),
    (lambda root: (root / "0").mkdir(parents=True), "holds no .jpg, .jpeg or .png file"),
])
def test_a_folder_it_cannot_use_is_one_line(exported, tmp_path, capsys, layout, message) -> None:
    layout(tmp_path / "images")
    assert runtime_main(["eval", str(exported), "--data", str(tmp_path / "images")]) == 2
    assert message in capsys.readouterr().err


def test_a_label_named_folder_maps_by_label_not_by_sorted_order(tmp_path) -> None:
    from vitsparse.runtime.evaluate import image_folder

    for name in ("cat", "ant"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "a.png")
    assert [i for _, i in image_folder(tmp_path, ("cat", "dog", "ant"))] == [2, 0]
    assert [i for _, i in image_folder(tmp_path, None)] == [0, 1]
