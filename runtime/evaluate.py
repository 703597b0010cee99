"""Top-1 and top-5 of an exported artifact on an engine, over an image folder, torch-free.

Images go through the server's own decoding and preprocessing (`preprocess.decode_image`,
`Preprocessing.apply`), so the accuracy measured here is the accuracy `vitsparse serve` delivers.
The folder is laid out as torchvision's ImageFolder: one sub-folder per class, classes indexed in
sorted order, unless the artifact's labels name every folder, in which case a folder's class is its
label's index. Files that will not decode are skipped and counted, not fatal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .engine_registry import create_engine
from .errors import RuntimeInputError
from .preprocess import ImageError, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Reference = Callable[[np.ndarray], np.ndarray]  # preprocessed images -> logits (the PyTorch model)


@dataclass
class Evaluation:
    """What `evaluate_artifact` measured; `agreement` is None when no reference model was given."""

    engine: str
    images: int = 0
    top1: float = 0.0
    top5: float = 0.0
    skipped: list[str] = field(default_factory=list)
    agreement: float | None = None

    def to_dict(self) -> dict:
        return {"engine": self.engine, "images": self.images, "top1": self.top1, "top5": self.top5,
                "skipped": len(self.skipped), "skipped_files": self.skipped[:20],
                "agreement_with_pytorch": self.agreement}


def image_folder(root: str | os.PathLike, labels: tuple[str, ...] | None) -> list[tuple[Path, int]]:
    """(image, class index) of every JPEG/PNG under root/<class>/; RuntimeInputError for a folder that
    is missing, holds no class folders, or has an empty class."""
    root = Path(root)
    if not root.is_dir():
        raise RuntimeInputError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise RuntimeInputError(f"{root} holds no class folders: lay it out as {root}/<class>/<image>.jpg")
    index = ({name: labels.index(name) for name in classes} if labels and set(classes) <= set(labels)
             else {name: i for i, name in enumerate(classes)})
    items = []
    for name in classes:
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RuntimeInputError(f"{root / name} holds no .jpg, .jpeg or .png file")
        items += [(path, index[name]) for path in files]
    return items


def evaluate_artifact(artifact: Artifact, root: str | os.PathLike, engine: str, *, batch_size: int = 16,
                      precision: str | None = None, num_cores: int | None = None,
                      reference: Reference | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Run every image of the folder through the artifact on `engine`; top-1/top-5 over the images
    that decode, and the share whose top-1 equals `reference`'s (when given)."""
    items = image_folder(root, artifact.labels)
    batch = batch_size if artifact.meta.get("dynamic_batch") else int(artifact.meta.get("batch_size", 1))
    compiled = create_engine(engine, artifact.onnx_path, batch_size=batch, num_cores=num_cores,
                             precision=precision)
    result = Evaluation(engine=compiled.name if precision is None else f"{compiled.name}:{precision}")
    hits1 = hits5 = agree = 0
    for pixels, targets in _batches(items, artifact, batch, result.skipped):
        logits = _run_padded(compiled, pixels, batch)
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        hits1 += int((ranked[:, 0] == targets).sum())
        hits5 += int((ranked == targets[:, None]).any(axis=1).sum())
        if reference is not None:
            agree += int((reference(pixels).argmax(axis=1) == ranked[:, 0]).sum())
        result.images += len(targets)
        if progress:
            progress(result.images + len(result.skipped), len(items))
    if not result.images:
        raise RuntimeInputError(f"no image under {root} could be decoded ({len(result.skipped)} skipped)")
    result.top1, result.top5 = hits1 / result.images, hits5 / result.images
    result.agreement = agree / result.images if reference is not None else None
    return result


def _batches(items: list[tuple[Path, int]], artifact: Artifact, size: int,
             skipped: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed images and their classes, `size` at a time; undecodable files go to `skipped`."""
    pixels, targets = [], []
    for path, target in items:
        try:
            pixels.append(artifact.preprocessing.apply(decode_image(path.read_bytes())))
            targets.append(target)
        except ImageError:
            skipped.append(str(path))
        if len(pixels) == size:
            yield np.stack(pixels), np.asarray(targets)
            pixels, targets = [], []
    if pixels:
        yield np.stack(pixels), np.asarray(targets)


def _run_padded(engine, pixels: np.ndarray, batch: int) -> np.ndarray:
    """The engine's logits for `pixels`, the last short batch padded with zeros to the compiled size."""
    padded = np.zeros((batch, *pixels.shape[1:]), dtype=np.float32)
    padded[: len(pixels)] = pixels
    return np.asarray(engine.run([padded])[0])[: len(pixels)]
