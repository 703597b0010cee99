"""Image bytes to model input with numpy and Pillow only, exactly as timm's eval transform does it.

timm evaluates a model by resizing the shorter side to floor(size / crop_pct) (PIL, the model's
interpolation), centre-cropping to the input size, scaling to [0, 1] and normalising by mean/std;
`Preprocessing.apply` repeats those steps on the same PIL calls, so a served model sees the pixels
its top-1 was measured on. Decoding refuses non-images, truncated files and decompression bombs.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RuntimeInputError

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
CROP_MODES = ("center", "squash")
REQUIRED_FIELDS = ("input_size", "interpolation", "crop_pct", "mean", "std")
IMAGE_MODES = {1: "L", 3: "RGB"}
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB; more is refused


class PreprocessingError(RuntimeInputError):
    """An artifact's preprocessing metadata the server cannot follow."""


class ImageError(RuntimeInputError):
    """Bytes that are not a usable image: not an image at all, truncated, or too large to decode."""


class ImageTooLargeError(ImageError):
    """An image whose declared size is over the pixel limit (a decompression bomb, or just too big)."""


@dataclass(frozen=True)
class Preprocessing:
    """timm's eval preprocessing: input (C, H, W), interpolation, crop_pct, crop_mode, mean and std."""

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_meta(cls, meta: Mapping[str, object]) -> Preprocessing:
        """Read meta.json's `preprocessing`; PreprocessingError names a missing or unusable field."""
        missing = [key for key in REQUIRED_FIELDS if key not in meta]
        if missing:
            raise PreprocessingError(f"preprocessing lacks {', '.join(missing)}")
        prep = cls(tuple(int(d) for d in meta["input_size"]), str(meta["interpolation"]),
                   float(meta["crop_pct"]), str(meta.get("crop_mode") or "center"),
                   tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]))
        prep.check()
        return prep

    def check(self) -> None:
        channels = self.input_size[0] if len(self.input_size) == 3 else None
        if channels not in IMAGE_MODES:
            raise PreprocessingError(f"input_size must be (1 or 3, H, W), got {list(self.input_size)}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(f"interpolation {self.interpolation!r} is not one of "
                                     f"{', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise PreprocessingError(f"crop_mode {self.crop_mode!r} is not supported; the server follows "
                                     f"{', '.join(CROP_MODES)}")
        if self.crop_mode == "center" and self.input_size[1] != self.input_size[2]:
            raise PreprocessingError("crop_mode 'center' is followed for square inputs only; "
                                     f"got {self.input_size[1]}x{self.input_size[2]}")
        if not 0 < self.crop_pct <= 1:
            raise PreprocessingError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if len(self.mean) != channels or len(self.std) != channels or not all(s > 0 for s in self.std):
            raise PreprocessingError(f"mean and std need {channels} value(s) each, std positive; got "
                                     f"{list(self.mean)} and {list(self.std)}")

    def apply(self, image: Image.Image) -> np.ndarray:
        """(C, H, W) float32: converted, resized, centre-cropped, scaled to [0, 1] and normalised."""
        channels, height, width = self.input_size
        image = image.convert(IMAGE_MODES[channels])
        resample = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "squash":
            size = (math.floor(width / self.crop_pct), math.floor(height / self.crop_pct))
        else:
            size = _shorter_side_size(image.size, math.floor(height / self.crop_pct))
        if image.size != size:
            image = image.resize(size, resample)
        image = _center_crop(image, width, height)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A fully decoded PIL image, or ImageError saying why not (checked before decoding the pixels)."""
    if not data:
        raise ImageError("the request body is empty: send the image file's bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise ImageError("the body is not an image Pillow can read (send JPEG or PNG bytes)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"the image declares too many pixels to decode ({exc})") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"the image declares {width}x{height} pixels, over the limit of "
                                     f"{max_pixels:,}")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
            raise ImageError(f"the {image.format or 'image'} data is truncated or corrupt: {exc}") from None
    return image


def _shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(W, H) with the shorter side `shorter` and the aspect ratio kept (torchvision's rounding)."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """torchvision's CenterCrop: round((size − crop) / 2) from the top left (sizes never smaller here)."""
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))
