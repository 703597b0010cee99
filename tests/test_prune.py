"""`vitsparse prune`: recipe files checked before any work, every shipped recipe run end to end on a digits
image folder, crash safety (SIGINT, SIGKILL, --resume), torchrun, and bad input as one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from starlette.testclient import TestClient

from vitsparse.bench.cli import main
from vitsparse.bench.plan import RECIPES_DIR, PlanError, load_plan
from vitsparse.bench.stages import STAGES
from vitsparse.bench.verify import torch_reference
from vitsparse.models import build_model
from vitsparse.models.digits import write_digits_imagefolder
from vitsparse.runtime import ENGINES, engine_status
from vitsparse.runtime.artifact import load_artifact
from vitsparse.runtime.evaluate import evaluate_artifact
from vitsparse.runtime.quantized import UNSUPPORTED
from vitsparse.runtime.server import ServeConfig, ServerMetrics, build_models, create_app

pytestmark = pytest.mark.slow  # trains and runs the prune CLI end to end

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
# a resumed run repeats the interrupted epoch from the same seed, data order and optimiser state: the
# weights match the uninterrupted run's to float rounding (thread scheduling can reorder sums)
RESUME_ATOL = 1e-5
AGREEMENT = 0.995  # of the engine's top-1 with PyTorch's: at most one of the 260 images may differ


@pytest.fixture(scope="module")
def digits_base() -> None:
    """digits-vit trained and cached before any child process needs it."""
    build_model("digits-vit", pretrained=True, progress=False)


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory, digits_base) -> Path:
    """digits-vit's splits as PNGs, 26 images of each class in train/ and in val/ (obs-fisher reads 256)."""
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", per_class=26)


def prune(recipe: Path, data: Path, out: Path, *extra: str, model: str = "digits-vit") -> int:
    flags = ["--pretrained"] if model == "digits-vit" else []
    return main(
        [
            "prune",
            model,
            *flags,
            "--recipe",
            str(recipe),
            "--data",
            str(data),
            "-o",
            str(out),
            "--epochs",
            "1",
            "--skip-speed",
            *extra,
        ]
    )


def classify(artifact: Path, image: Path, engine: str = "onnxruntime") -> dict:
    config = ServeConfig(engine=engine)
    metrics = ServerMetrics()
    app = create_app(build_models([load_artifact(artifact)], config, metrics), config, metrics)
    with TestClient(app) as client:
        reply = client.post(
            f"/v2/models/{artifact.name}/classify",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
        )
    assert reply.status_code == 200, reply.text
    return reply.json()


def engines_for(artifact) -> list[str]:
    """The engines here that run the artifact: one with sparse-kernel nodes only on openvino-sparse, an
    INT8 file only where its format runs as INT8."""
    if (artifact.meta.get("sparse_kernels") or {}).get("layers"):
        return ["openvino-sparse"]
    form = (artifact.meta.get("quantization") or {}).get("format")
    return [e for e in ENGINES if engine_status(e).available and (e, form) not in UNSUPPORTED]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_gives_an_artifact_that_eval_and_serve_accept(
    recipe, digits_data, tmp_path
) -> None:
    out = tmp_path / "run"
    assert prune(recipe, digits_data, out) == 0
    run = json.loads((out / "run.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert run["status"] == "finished"
    assert [row["method"] for row in results["rows"]] == ["dense", "recipe"]
    assert len(results["rows"][1]["stages"]) == len(load_plan(recipe).stages)
    artifact = load_artifact(out / "artifact")
    reference = torch_reference(artifact)
    engines = engines_for(artifact)
    if load_plan(recipe).settings.sparse_kernels:
        assert artifact.meta["sparse_kernels"]["layers"] > 0 and engines == ["openvino-sparse"]
        if not engine_status("openvino-sparse").available:
            pytest.skip(engine_status("openvino-sparse").reason)
    else:
        assert "onnxruntime" in engines
    for engine in engines:
        evaluation = evaluate_artifact(artifact, digits_data / "val", engine, reference=reference)
        assert evaluation.images == 260 and evaluation.agreement >= AGREEMENT, engine
        # served preprocessing (the server's) against trained (timm's): within a point
        assert abs(evaluation.top1 - results["rows"][1]["top1"]) <= 0.01, engine
    reply = classify(out / "artifact", next((digits_data / "val" / "7").iterdir()),
                     "onnxruntime" if "onnxruntime" in engines else engines[0])
    assert reply["predictions"][0]["label"] in [str(d) for d in range(10)]


def test_the_shipped_recipes_use_every_stage() -> None:
    used = {stage.kind for recipe in RECIPES for stage in load_plan(recipe).stages}
    assert used == set(STAGES)


@pytest.mark.parametrize(
    "text, where, says",
    [
        ("stages:\n  - prune: {}\n", "stage 1 (prune, line 2)", "unknown stage; choose from vtp-scores"),
        (
            "stages:\n  - finetune: {epochs: 2}\n  - finetune: {epoch: 2}\n",
            "stage 2 (finetune, line 3)",
            "epoch: unknown key; allowed: epochs",
        ),
        (
            "stages:\n  - finetune: {epochs: two}\n",
            "stage 1 (finetune, line 2)",
            "epochs: must be a whole number",
        ),
        ("stages:\n  - finetune: {distill: 1}\n", "stage 1", "distill: must be true or false"),
        ("stages:\n  - sparsity: {sparsity: 1.5}\n", "stage 1 (sparsity", "sparsity must lie in [0, 1)"),
        ("stages:\n  - vtp-scores: {}\n  - vtp-slice: {rate: 1.2}\n", "stage 2 (vtp-slice", "rate must lie"),
        (
            "stages:\n  - finetune: {augment: flips}\n",
            "stage 1",
            "augment: must be one of 'timm', 'shift', 'none'",
        ),
        (
            "stages:\n  - vtp-slice: {rate: 0.4}\n",
            "stage 1 (vtp-slice",
            "needs a vtp-scores stage right before",
        ),
        (
            "stages:\n  - int8: {}\n  - sparsity: {sparsity: 0.5}\n",
            "stage 2 (sparsity",
            "masks cannot come after INT8",
        ),
        (
            "stages:\n  - sparsity: {sparsity: 0.5}\n  - vtp-scores: {}\n  - vtp-slice: {}\n",
            "stage 2",
            "slicing cannot come after masks",
        ),
        ("stages:\n  - qat: {}\n", "stage 1 (qat", "runs only after a int8 stage"),
        (
            "stages:\n  - token-thresholds: {}\n  - finetune: {}\n",
            "stage 1",
            "must be followed by a token-drop",
        ),
        ("stages:\n  - token-drop: {keep_rate: 0.5, flops_ratio: 0.5}\n", "stage 1", "give exactly one"),
        ("seed: zero\nstages:\n  - finetune: {}\n", "plan.yaml: seed", "must be a whole number"),
        (
            "int8_format: operator\nsparse_kernels: true\nstages:\n  - int8: {}\n",
            "plan.yaml",
            "sparse_kernels: true needs int8_format: qdq",
        ),
        ("stages: []\n", "plan.yaml", "non-empty list `stages`"),
        ("stages:\n  - finetune: {epochs: 2\n", "plan.yaml", "not valid YAML"),
    ],
)
def test_a_recipe_error_is_one_line_naming_file_stage_line_and_key(tmp_path, text, where, says) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    message = str(caught.value)
    assert "\n" not in message and where in message and says in message, message


def test_a_json_recipe_is_read_too(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"stages": [{"sparsity": {"sparsity": 0.5}}, {"finetune": {"epochs": 1}}]}))
    assert [s.kind for s in load_plan(path).stages] == ["sparsity", "finetune"]


def _copy_folder(source: Path, target: Path) -> Path:
    for path in source.rglob("*.png"):
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def _missing_val(root: Path) -> None:
    for path in (root / "val").rglob("*"):
        if path.is_file():
            path.unlink()
    for path in sorted((root / "val").glob("*"), reverse=True):
        path.rmdir()
    (root / "val").rmdir()


@pytest.mark.parametrize(
    "spoil, says",
    [
        (_missing_val, "has no val/ folder"),
        (lambda root: (root / "train" / "9b").mkdir(), "holds no .jpg, .jpeg or .png file"),
        (
            lambda root: _copy_folder(root / "val" / "3", root / "val" / "3b"),
            "train/ and val/ hold different classes",
        ),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(digits_data, tmp_path, capsys, spoil, says) -> None:
    data = _copy_folder(digits_data, tmp_path / "data")
    spoil(data)
    assert prune(RECIPES[0], data, tmp_path / "out") == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_classes_that_do_not_match_the_head_are_refused_or_the_head_replaced(
    digits_data, tmp_path, capsys
) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
            _copy_folder(digits_data / split / str(digit), data / split / name)
    (data / "train" / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    magnitude = Path(__file__).parents[1] / "recipes" / "magnitude.yaml"
    assert prune(magnitude, data, tmp_path / "out") == 2
    assert "head has 10 outputs" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert prune(magnitude, data, tmp_path / "out", "--replace-head") == 0
    assert "skipped 1 files that are not readable images" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "artifact" / "meta.json").read_text())
    assert meta["labels"] == ["one", "seven", "zero"]


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(digits_data, tmp_path, capsys) -> None:
    bad = tmp_path / "model.pth"
    torch.save([1, 2, 3], bad)
    code = main(
        [
            "prune",
            "digits-vit",
            "--checkpoint",
            str(bad),
            "--recipe",
            str(RECIPES[0]),
            "--data",
            str(digits_data),
            "-o",
            str(tmp_path / "out"),
            "--skip-speed",
        ]
    )
    assert code == 2 and "state dict" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("seconds", ["0", "-1"])
def test_a_timing_block_of_no_time_is_refused_before_any_work(digits_data, tmp_path, capsys, seconds) -> None:
    code = main(["prune", "digits-vit", "--recipe", str(RECIPES[0]), "--data", str(digits_data),
                 "-o", str(tmp_path / "out"), "--time", seconds])
    assert code == 2 and "--time must be > 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_output_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(
    digits_data, tmp_path, capsys
) -> None:
    magnitude = Path(__file__).parents[1] / "recipes" / "magnitude.yaml"
    out = tmp_path / "out"
    assert prune(magnitude, digits_data, out) == 0
    assert prune(magnitude, digits_data, out) == 2
    assert "already holds a finished run; pass --resume" in capsys.readouterr().err
    assert prune(magnitude, digits_data, out, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert prune(magnitude, digits_data, out, "--overwrite") == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert prune(magnitude, digits_data, other, "--overwrite") == 2
    assert "holds no vitsparse prune run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


RESUMABLE = """seed: 3
stages:
  - vtp-scores: {epochs: 3, augment: none}
  - vtp-slice: {rate: 0.4, multiple: 8}
  - finetune: {epochs: 4, augment: timm}
"""


def _command(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vitsparse.bench.cli",
        "prune",
        "digits-vit",
        "--pretrained",
        "--recipe",
        str(recipe),
        "--data",
        str(data),
        "-o",
        str(out),
        "--skip-speed",
        *extra,
    ]


def _stop_after(command: list[str], log: Path, stage: int, epoch: int, sig: int) -> int:
    """Run `command`, send `sig` once log.jsonl shows that epoch of that stage; the exit code."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if any(e["event"] == "epoch" and e["stage"] == stage and e["epoch"] == epoch for e in events):
            process.send_signal(sig)
            break
        time.sleep(0.02)
    return process.wait(timeout=240)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory, digits_base) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("resume") / "digits", per_class=30)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, resume_data) -> Path:
    folder = tmp_path_factory.mktemp("whole")
    recipe = folder / "plan.yaml"
    recipe.write_text(RESUMABLE)
    subprocess.run(
        _command(recipe, resume_data, folder / "out"), check=True, capture_output=True, timeout=300
    )
    return folder / "out"


@pytest.mark.parametrize(
    "sig, stage, epoch",
    [(signal.SIGINT, 3, 2), (signal.SIGKILL, 1, 1)],
    ids=["sigint-in-finetune", "sigkill-in-score-training"],
)
def test_a_run_stopped_mid_stage_resumes_to_the_uninterrupted_result(
    uninterrupted, resume_data, tmp_path, sig, stage, epoch
) -> None:
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(RESUMABLE)
    out = tmp_path / "out"
    code = _stop_after(_command(recipe, resume_data, out), out / "log.jsonl", stage, epoch, sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not (out / "artifact").exists() and not (out / "results.json").exists()
    done = subprocess.run(
        _command(recipe, resume_data, out, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after stage" in done.stdout or stage == 1
    ours, whole = (load_file(str(o / "artifact" / "weights.safetensors")) for o in (out, uninterrupted))
    assert ours.keys() == whole.keys()
    worst = max(float((ours[k] - whole[k]).abs().max()) for k in ours)
    assert worst <= RESUME_ATOL, worst


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_on_two_cpu_processes_ends_with_identical_weights_and_masks(digits_data, tmp_path) -> None:
    recipe = tmp_path / "plan.yaml"
    recipe.write_text("stages:\n  - sparsity: {sparsity: 0.6}\n  - finetune: {epochs: 2, augment: none}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    port = str(_free_port())
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command = head + _command(recipe, digits_data, tmp_path / "out")[1:]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = [json.loads((tmp_path / "out" / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "finished"


def test_a_rank_other_than_0_finishes_without_reading_the_last_checkpoint(tmp_path) -> None:
    """Only rank 0 writes OUT, and it may still be saving the last stage when another rank ends its
    stages: that rank must not read it (under load on CI, torchrun's rank 1 once failed that way)."""
    from types import SimpleNamespace

    from vitsparse.bench.prune import _finish
    from vitsparse.bench.run_folder import RunFolder

    stages = [{"stage": "start", "top1": 0.9}, {"stage": "finetune", "top1": 0.8}]
    result = _finish(SimpleNamespace(out=tmp_path), SimpleNamespace(stages=[object()]),
                     RunFolder(tmp_path, writer=False), None, None, stages)
    assert (result.top1_before, result.top1_after) == (0.9, 0.8) and not any(tmp_path.iterdir())


def test_the_digits_folder_holds_digits_vit_splits_as_pngs(digits_data) -> None:
    image = Image.open(next((digits_data / "train" / "0").iterdir()))
    assert image.size == (8, 8) and image.mode == "L"
    assert sorted(p.name for p in (digits_data / "val").iterdir()) == [str(d) for d in range(10)]


def test_prune_and_bench_takes_its_combined_settings_from_the_recipe_files(tmp_path, monkeypatch) -> None:
    from vitsparse.bench.combined import SPEC, SPEED_RECIPE, from_plan

    monkeypatch.chdir(tmp_path)  # recipes/... names the shipped file from any folder
    parsed = SPEC.parse("recipes/combined.yaml")
    assert (parsed.setting, parsed.schedule) == from_plan(load_plan(RECIPES_DIR / "combined.yaml"))
    assert SPEC.parse("combined").setting == parsed.setting  # a name in recipes/
    assert SPEC.parse("recipes/combined.yaml+int8").setting.int8 and not parsed.setting.int8
    assert from_plan(load_plan(RECIPES_DIR / "combined-int8-speed.yaml"))[0] == SPEED_RECIPE
    edited = tmp_path / "combined.yaml"
    edited.write_text((RECIPES_DIR / "combined.yaml").read_text().replace("rate: 0.2", "rate: 0.3"))
    assert SPEC.parse(str(edited)).setting.vtp_rate == 0.3
    edited.write_text("stages:\n  - sparsity: {saliency: magnitude, sparsity: 0.5}\n")
    with pytest.raises(ValueError, match="masks are obs-fisher with solver"):
        SPEC.parse(str(edited))
    edited.write_text("stages:\n  - token-drop: {flops_ratio: 0.65}\n")
    with pytest.raises(ValueError, match="give token-drop a keep_rate instead of flops_ratio 0.65"):
        SPEC.parse(str(edited))
    with pytest.raises(ValueError, match="no recipe file"):
        SPEC.parse(str(tmp_path / "missing.yaml"))


def test_each_method_recipe_is_a_point_of_prune_and_bench_s_sweep() -> None:
    from vitsparse.bench.profiles import DEFAULT, FULL
    from vitsparse.bench.token_drop import FINETUNE_EPOCHS, flops_ratio
    from vitsparse.models import build_model

    settings = {}
    for entry in FULL.entries:
        settings.setdefault(entry.method, set()).add(entry.setting.removesuffix("+int8").split(":")[0])
    stages = {p.stem: {s.kind: s.stage for s in load_plan(p).stages} for p in RECIPES}
    assert str(stages["vtp"]["vtp-slice"].rate) in settings["vtp"]
    assert str(stages["head-channels"]["head-channel-slice"].budget) in settings["heads"]
    keep_rates = {float(k) for k in settings["tokens"]}
    ratios = {flops_ratio(build_model("digits-vit"), k) for k in keep_rates}
    assert min(abs(stages["token-drop"]["token-drop"].flops_ratio - r) for r in ratios) < 0.03
    assert stages["token-drop"]["finetune"].epochs == FINETUNE_EPOCHS
    for name in ("magnitude", "obs-layerwise", "obs-fisher"):
        assert str(stages[name]["sparsity"].sparsity) in settings[name]
    assert str(stages["int8"]["sparsity"].sparsity) in settings["int8"]
    for name in ("vtp", "head-channels", "magnitude", "obs-layerwise", "obs-fisher", "int8"):
        assert stages[name]["finetune"].epochs == DEFAULT.epochs


def test_eval_of_an_int8_artifact_in_the_operator_format_agrees_with_pytorch_on_deepsparse(
    digits_data, tmp_path
):
    if not engine_status("deepsparse").available:
        pytest.skip(engine_status("deepsparse").reason)
    recipe = tmp_path / "int8.yaml"
    recipe.write_text(
        (RECIPES_DIR / "int8.yaml").read_text().replace("int8_format: qdq", "int8_format: operator")
    )
    assert prune(recipe, digits_data, tmp_path / "run") == 0
    artifact = load_artifact(tmp_path / "run" / "artifact")
    assert artifact.meta["quantization"]["format"] == "operator"
    evaluation = evaluate_artifact(
        artifact, digits_data / "val", "deepsparse", reference=torch_reference(artifact)
    )
    assert evaluation.images == 260 and evaluation.agreement >= AGREEMENT


def test_the_report_times_the_pruned_model_beside_the_starting_one(digits_data, tmp_path) -> None:
    magnitude = RECIPES_DIR / "magnitude.yaml"
    code = main(
        [
            "prune",
            "digits-vit",
            "--pretrained",
            "--recipe",
            str(magnitude),
            "--data",
            str(digits_data),
            "-o",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--engines",
            "onnxruntime,torch",
            "--time",
            "0.05",
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    timed = {(e["engine"], e["batch"]) for e in rows[1]["speed"]}
    assert timed == {("onnxruntime", 1), ("onnxruntime", 16), ("torch", 1), ("torch", 16)}
    assert all(e["speedup_vs_dense_same_engine"] > 0 for e in rows[1]["speed"])
    assert "## Speed" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "speedup.png").is_file() and not (tmp_path / "run" / ".speed").exists()


@pytest.mark.parametrize("replace_head", [False, True])
def test_a_new_head_trains_from_labels_not_from_the_starting_model(digits_data, tmp_path, monkeypatch,
                                                                    replace_head) -> None:
    from vitsparse.bench import stages

    teachers = []

    def recording_finetune(model, train, val=None, config=None, teacher=None, progress=True):
        teachers.append(teacher)

    monkeypatch.setattr(stages, "finetune", recording_finetune)
    head = ["--replace-head"] if replace_head else []
    recipe = str(RECIPES_DIR / "magnitude.yaml")
    code = main(["prune", "digits-vit", "--pretrained", *head, "--recipe", recipe, "--data", str(digits_data),
                 "-o", str(tmp_path / "run"), "--epochs", "1", "--skip-speed"])
    assert code == 0 and len(teachers) == 1
    assert (teachers[0] is None) == replace_head
