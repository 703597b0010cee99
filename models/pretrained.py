"""Trained ``digits-vit`` weights: trained on first use, then cached per config under the user cache dir."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from vitsparse.runtime.atomic import atomic_path

from .cache import cache_dir as default_cache_dir
from .digits import FORMAT_VERSION, DigitsViTConfig, build_digits_architecture
from .train import TrainMetrics, train_digits_vit
from .weights import load_checkpoint, save_state_dict

logger = logging.getLogger(__name__)
CACHE_PREFIX = "digits-vit"
_DIGEST_CHARS = 16


def cached_weights_path(
    config: DigitsViTConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the weights for ``config`` live: ``<cache>/digits-vit-<config hash>.safetensors``."""
    config = config if config is not None else DigitsViTConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{CACHE_PREFIX}-{config.digest()[:_DIGEST_CHARS]}.safetensors"


def metrics_path(weights_path: str | os.PathLike) -> Path:
    """The JSON sidecar holding the metrics of the cached weights at ``weights_path``."""
    return Path(weights_path).with_suffix(".json")


def digits_vit(
    config: DigitsViTConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> VisionTransformer:
    """The trained ``digits-vit`` in eval mode: loaded from the cache, or trained once and cached.

    A cache file that cannot be read is retrained with a warning; an unwritable cache only warns.
    Processes that want the same entry at once (torchrun ranks, parallel test workers) train it once:
    the others wait for the first and load what it wrote.
    """
    config = config if config is not None else DigitsViTConfig()
    path = cached_weights_path(config, cache_dir)
    with _entry_lock(path):
        model = _load_cached(config, path)
        if model is None:
            logger.info("training digits-vit for the first time; weights will be cached at %s", path)
            model, metrics = train_digits_vit(config, progress=progress)
            _write_cache(model, metrics, config, path)
    return model.eval()


@contextlib.contextmanager
def _entry_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry at `path` (a file under `<cache>/.locks/`).

    Where the platform has no `fcntl` or the cache folder is not writable there is no lock: concurrent
    first uses then each train, and the atomic writes keep the entry whole.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = path.parent / ".locks" / f"{path.stem}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError:
        yield
        return
    with handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish digits-vit's cache entry %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load_cached(config: DigitsViTConfig, path: Path) -> VisionTransformer | None:
    if not path.exists():
        return None
    model = build_digits_architecture(config)
    try:
        load_checkpoint(model, path)
    except (ValueError, OSError) as err:
        warnings.warn(
            f"cached digits-vit weights are unusable, retraining: {err}", RuntimeWarning, stacklevel=3
        )
        return None
    return model


def _write_cache(
    model: VisionTransformer, metrics: TrainMetrics, config: DigitsViTConfig, path: Path
) -> None:
    """Write the metrics sidecar, then the weights (whose presence marks a complete cache entry)."""
    config_json = json.dumps(dataclasses.asdict(config), sort_keys=True)
    sidecar = {"format": FORMAT_VERSION, "digest": config.digest(), **dataclasses.asdict(metrics)}
    sidecar["config"] = dataclasses.asdict(config)
    try:
        with atomic_path(metrics_path(path)) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        save_state_dict(model, path, metadata={"format": str(FORMAT_VERSION), "config": config_json})
    except OSError as err:
        warnings.warn(f"could not cache digits-vit weights at {path}: {err}", RuntimeWarning, stacklevel=3)

