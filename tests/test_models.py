"""Tests for vitsparse.models: factory, weights, the digits-vit cache and training, data, evaluation."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vitsparse.models.pretrained as pretrained_module
from vitsparse.models import (
    DigitsViTConfig,
    EvalResult,
    build_model,
    cache_dir,
    cached_weights_path,
    digits_datasets,
    digits_loaders,
    digits_vit,
    evaluate,
    imagefolder_loader,
    list_builtin_models,
    load_checkpoint,
    save_state_dict,
    train_digits_vit,
)

TINY = DigitsViTConfig(epochs=1, embed_dim=32, depth=2, num_heads=2)
CPU = torch.device("cpu")


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def tiny_digits(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-vit", config=TINY, **overrides)


@pytest.fixture
def no_training(monkeypatch):
    """Make any digits-vit training fail, proving a result came from the cache."""
    monkeypatch.setattr(pretrained_module, "train_digits_vit", _refuse_training)


# --- digits-vit: accuracy, cache, determinism ------------------------------------------------------


@pytest.mark.slow  # trains digits-vit
def test_default_digits_vit_reaches_95_percent_test_top1():
    config = DigitsViTConfig()
    model = digits_vit(config, progress=False)  # real user cache: trains once per machine
    data = digits_datasets(config.split_seed)
    result = evaluate(model, DataLoader(data.test, batch_size=256), device=CPU)
    assert result.num_samples == len(data.test)
    assert result.top1 >= 0.95


def test_build_model_digits_vit_pretrained_uses_cache(tmp_path, no_training):
    save_state_dict(tiny_digits(seed=3), cached_weights_path(TINY, tmp_path))
    model = build_model("digits-vit", pretrained=True, config=TINY, cache_dir=tmp_path)
    assert_same_state(model, tiny_digits(seed=3))
    assert not model.training


def test_cache_written_atomically_then_loaded_without_training(tmp_path, monkeypatch):
    first = digits_vit(TINY, cache_dir=tmp_path, progress=False)
    path = cached_weights_path(TINY, tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())  # no temp file left; .locks/ aside
    assert written == sorted([path.name, path.with_suffix(".json").name])
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert {"test_top1", "val_top1", "train_seconds", "torch_version"} <= sidecar.keys()
    assert sidecar["config"] == dataclasses.asdict(TINY)

    monkeypatch.setattr(pretrained_module, "train_digits_vit", _refuse_training)
    second = digits_vit(TINY, cache_dir=tmp_path, progress=False)
    assert_same_state(first, second)


def test_concurrent_first_uses_train_the_entry_once(tmp_path, monkeypatch):
    """Two callers at once (threads here; torchrun ranks or test workers in practice): one trains, the
    other waits for the entry and loads it. The first training waits up to 2 s for a second to start."""
    calls, second_started = [], threading.Event()

    def watched_training(config, progress):
        calls.append(config)
        if len(calls) == 2:
            second_started.set()
        second_started.wait(timeout=2)
        return train_digits_vit(config, progress=progress)

    monkeypatch.setattr(pretrained_module, "train_digits_vit", watched_training)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: digits_vit(TINY, cache_dir=tmp_path, progress=False), range(2))
    assert len(calls) == 1
    assert_same_state(first, second)


def _refuse_training(*args, **kwargs):
    raise AssertionError("digits-vit was retrained although a cache entry exists")


def test_corrupt_cache_is_retrained_with_warning(tmp_path):
    path = cached_weights_path(TINY, tmp_path)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="retraining"):
        model = digits_vit(TINY, cache_dir=tmp_path, progress=False)
    assert_same_state(model, load_checkpoint(tiny_digits(seed=5), path))


def test_cache_key_depends_on_config(tmp_path):
    assert cached_weights_path(TINY, tmp_path) == cached_weights_path(
        DigitsViTConfig(**dataclasses.asdict(TINY)), tmp_path
    )
    assert cached_weights_path(TINY, tmp_path) != cached_weights_path(
        dataclasses.replace(TINY, seed=1), tmp_path
    )


def test_the_suite_never_writes_to_the_user_cache():
    assert cache_dir() != Path.home() / ".cache" / "vitsparse"
    assert str(cache_dir()).startswith(tempfile.gettempdir())


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSPARSE_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("VITSPARSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vitsparse"


def test_training_is_deterministic_and_restores_global_state():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    flag_before = torch.are_deterministic_algorithms_enabled()
    first, metrics = train_digits_vit(TINY, progress=False)
    second, _ = train_digits_vit(TINY, progress=False)
    assert_same_state(first, second)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert torch.are_deterministic_algorithms_enabled() == flag_before
    assert 0.0 <= metrics.test_top1 <= 1.0 and metrics.epochs == 1 and not first.training


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DigitsViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="needs in_chans=1, img_size=8"):
        train_digits_vit(dataclasses.replace(TINY, img_size=16), progress=False)


# --- digits data -----------------------------------------------------------------------------------


def test_digits_splits_are_stratified_normalised_and_seeded():
    data = digits_datasets(seed=0)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 1797 and min(sizes[1:]) >= 260
    images = data.train.tensors[0]
    assert images.shape[1:] == (1, 8, 8)
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-2
    assert np.bincount(data.test.tensors[1].numpy()).min() >= 25  # every class present in test
    assert torch.equal(digits_datasets(seed=0).test.tensors[0], data.test.tensors[0])
    assert not torch.equal(digits_datasets(seed=1).test.tensors[1], data.test.tensors[1])


def test_digits_loaders_shuffle_reproducibly():
    first = next(iter(digits_loaders(batch_size=16, seed=7).train))[1]
    second = next(iter(digits_loaders(batch_size=16, seed=7).train))[1]
    assert torch.equal(first, second)


# --- build_model -----------------------------------------------------------------------------------


def test_build_model_timm_vit_with_kwargs():
    model = build_model("deit_tiny_patch16_224", img_size=32, num_classes=10)
    assert isinstance(model, VisionTransformer) and not model.training
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_accepts_vit_subclasses():
    model = build_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10)
    assert type(model).__name__ == "VisionTransformerDistilled"


def test_build_model_builtin_digits_vit_random_init():
    assert "digits-vit" in list_builtin_models()
    model = build_model("digits-vit", depth=6, embed_dim=64)
    assert isinstance(model, VisionTransformer) and len(model.blocks) == 6
    assert model.pretrained_cfg["input_size"] == (1, 8, 8) and len(model.pretrained_cfg["mean"]) == 1
    with pytest.raises(ValueError, match="unknown arguments"):
        build_model("digits-vit", bogus=1)


@pytest.mark.parametrize("pretrained", [False, True])
def test_build_model_rejects_non_vit(pretrained):
    with pytest.raises(ValueError, match="ResNet.*not a timm.models.vision_transformer.VisionTransformer"):
        build_model("resnet18", pretrained=pretrained)  # pretrained: rejected before any download


def test_build_model_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean.*deit_tiny_patch16_224"):
        build_model("deit_tiny_patch16_22")


def test_build_model_bad_timm_kwarg():
    with pytest.raises(ValueError, match="could not build"):
        build_model("deit_tiny_patch16_224", img_size=32, not_an_argument=1)


# --- weights ---------------------------------------------------------------------------------------


def test_safetensors_round_trip_via_build_model(tmp_path):
    source, x = tiny_digits(seed=1), torch.randn(4, 1, 8, 8)
    path = save_state_dict(source, tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    loaded = build_model("digits-vit", config=TINY, checkpoint=path)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_pth_round_trip_with_wrappers(tmp_path):
    source, x = tiny_digits(seed=1), torch.randn(4, 1, 8, 8)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    loaded = load_checkpoint(tiny_digits(seed=2), tmp_path / "w.pth")
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_pos_embed_is_resized_for_another_image_size(tmp_path):
    path = save_state_dict(tiny_digits(seed=1), tmp_path / "w.safetensors")
    bigger = build_model("digits-vit", config=dataclasses.replace(TINY, img_size=16), checkpoint=path)
    assert bigger.pos_embed.shape[1] == 1 + 8 * 8


def test_pickled_module_is_refused(tmp_path):
    torch.save(tiny_digits(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="pickled Python objects.*state_dict"):
        load_checkpoint(tiny_digits(), tmp_path / "module.pt")


def test_missing_and_mismatched_keys_are_reported(tmp_path):
    state = tiny_digits().state_dict()
    del state["head.weight"]
    state["extra"] = torch.zeros(1)
    save_state_dict(state, tmp_path / "partial.safetensors")
    with pytest.raises(
        ValueError, match=r"missing keys \(1\): head.weight[\s\S]*unexpected keys \(1\): extra"
    ):
        load_checkpoint(tiny_digits(), tmp_path / "partial.safetensors")
    save_state_dict(tiny_digits(), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(build_model("digits-vit", embed_dim=64), tmp_path / "small.safetensors")


def test_missing_corrupt_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tiny_digits(), tmp_path / "nope.safetensors")
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"garbage" * 10)
        with pytest.raises(ValueError, match="could not read"):
            load_checkpoint(tiny_digits(), tmp_path / name)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(tiny_digits(), tmp_path / "w.npz")


# --- ImageFolder data ------------------------------------------------------------------------------


def write_image_folder(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_imagefolder_loader_and_evaluate(tmp_path):
    root = write_image_folder(tmp_path / "data")
    model = build_model("deit_tiny_patch16_224", img_size=32, num_classes=10)
    loader = imagefolder_loader(root, model, batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1]
    result = evaluate(model, loader, device=CPU)
    assert result.num_samples == 6 and result.top5 is not None


def test_imagefolder_loader_grayscale_model(tmp_path):
    root = write_image_folder(tmp_path / "data")
    images, _ = next(iter(imagefolder_loader(root, tiny_digits(), batch_size=6, train=True)))
    assert images.shape == (6, 1, 8, 8)


def test_imagefolder_loader_errors(tmp_path):
    model = tiny_digits()
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        imagefolder_loader(tmp_path / "missing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        imagefolder_loader(tmp_path / "empty", model)
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable images"):
        imagefolder_loader(tmp_path / "no_images", model)


# --- evaluate --------------------------------------------------------------------------------------


class ConstantLogits(nn.Module):
    """Returns the same logits (ascending in the class index) for every input."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :1]) + self.logits


def labelled_loader(labels: list[int]) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(len(labels), 2), torch.tensor(labels)), batch_size=3)


def test_evaluate_constant_model_with_top5():
    labels = [9, 9, 5, 4, 0, 9, 7, 1, 2, 3]  # predicted class is 9; top-5 is {5..9}
    result = evaluate(ConstantLogits(10), labelled_loader(labels), device=CPU)
    assert result == EvalResult(top1=0.3, top5=0.5, num_samples=10)


def test_evaluate_few_classes_has_no_top5_and_works_on_graph_modules():
    model = torch.fx.symbolic_trace(ConstantLogits(3))
    model.train()
    result = evaluate(model, labelled_loader([2, 0, 2, 1]), device=CPU)
    assert result == EvalResult(top1=0.5, top5=None, num_samples=4)
    assert model.training  # mode restored


def test_evaluate_empty_loader():
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(ConstantLogits(3), [], device=CPU)
