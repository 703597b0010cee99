"""Image bytes to model input with numpy and Pillow only, exactly as timm's eval transform does it.

timm evaluates a model by resizing the shorter side to floor(size / crop_pct) (PIL, the model's
interpolation), centre-cropping to the input size, scaling to [0, 1] and normalising by mean/std;
`Preprocessing.apply` repeats those steps on the same PIL calls, so a served model sees the pixels
its top-1 was measured on. Decoding serves JPEG and PNG only, and refuses other formats, non-images,
corrupt files, decompression bombs and extreme aspect ratios before any pixel is decoded, so what a
request can allocate is bounded by the pixel limit and, after resizing, by the model's input size.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RuntimeInputError, first_line

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
CROP_MODES = ("center", "squash")
REQUIRED_FIELDS = ("input_size", "interpolation", "crop_pct", "mean", "std")
IMAGE_MODES = {1: "L", 3: "RGB"}
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB; more is refused
# longest side over shortest: resizing the shorter side to the model's keeps the ratio, so a 1x5,000,000
# PNG (10 KB) would become 224 x 1.1e9 pixels; 20:1 bounds the resized image at 20 model inputs
MAX_ASPECT_RATIO = 20
SERVED_FORMATS = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",)}
# formats Pillow could decode that are refused with 415 (by their leading bytes), to say what was sent
OTHER_FORMATS = {"GIF": (b"GIF87a", b"GIF89a"), "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*"),
                 "WebP": (b"RIFF",), "ICO": (b"\x00\x00\x01\x00",)}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNGs open in one of these


class PreprocessingError(RuntimeInputError):
    """An artifact's preprocessing metadata the server cannot follow."""


class ImageError(RuntimeInputError):
    """Bytes that are not a usable image: not an image at all, truncated, or too large to decode."""


class ImageTooLargeError(ImageError):
    """An image whose declared size is over the pixel limit (a decompression bomb, or just too big)."""


class UnsupportedImageFormatError(ImageError):
    """An image in a format the server does not serve (it serves JPEG and PNG)."""


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
        if not isinstance(meta, Mapping):
            raise PreprocessingError(f"preprocessing must be an object, got {type(meta).__name__}")
        missing = [key for key in REQUIRED_FIELDS if meta.get(key) is None]
        if missing:
            raise PreprocessingError(f"preprocessing lacks {', '.join(missing)}")
        prep = cls(_numbers(meta, "input_size", int), _text(meta, "interpolation"),
                   _numbers(meta, "crop_pct", float, listed=False), _text(meta, "crop_mode", "center"),
                   _numbers(meta, "mean", float), _numbers(meta, "std", float))
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
        check_aspect_ratio(*image.size)
        image = _converted(image, IMAGE_MODES[channels])
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


def _numbers(meta: Mapping[str, object], key: str, kind: type, listed: bool = True) -> Any:
    """meta[key]: a list of `kind` (int: whole numbers only), or one float when not `listed`."""
    value = meta[key]
    sequence = isinstance(value, (list, tuple))
    values = value if listed and sequence else [value]
    if listed != sequence or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (kind is float or v == int(v)) for v in values):
        what = {(True, int): "a list of whole numbers", (True, float): "a list of finite numbers"}.get(
            (listed, kind), "a finite number")
        raise PreprocessingError(f"preprocessing {key} must be {what}, got {value!r}"[:200])
    converted = tuple(kind(v) for v in values)
    return converted if listed else converted[0]


def _text(meta: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = meta.get(key) or default
    if not isinstance(value, str):
        raise PreprocessingError(f"preprocessing {key} must be a string, got {value!r}"[:200])
    return value


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A fully decoded JPEG or PNG, or ImageError saying why not (size and shape are checked from the
    header, before any pixel is decoded)."""
    image = _open_header(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image declares {width}x{height} pixels, over the limit of "
                                 f"{max_pixels:,}")
    check_aspect_ratio(width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
        except MemoryError:
            raise
        except Exception as exc:  # Pillow raises many kinds on corrupt data: each is the client's file
            raise ImageError(f"the {image.format} data is truncated or corrupt: {first_line(exc)}") from None
    return image


def check_aspect_ratio(width: int, height: int) -> None:
    """ImageError for an empty image or one over MAX_ASPECT_RATIO:1 (its resized copy would be huge)."""
    if min(width, height) < 1:
        raise ImageError(f"the image is {width}x{height} pixels: it has no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"the image is {width}x{height} pixels, longer than {MAX_ASPECT_RATIO}:1; crop it "
                         f"closer to the model's square input first")


def _open_header(data: bytes) -> Image.Image:
    """The image opened (its header read) if `data` is a JPEG or PNG file."""
    if not data:
        raise ImageError("the request body is empty: send the image file's bytes")
    served = _format_of(data, SERVED_FORMATS)
    if served is None:
        other = _format_of(data, OTHER_FORMATS)
        if other is not None and (other != "WebP" or data[8:12] == b"WEBP"):
            raise UnsupportedImageFormatError(f"{other} images are not served: send JPEG or PNG")
        raise ImageError("the body is not an image: send JPEG or PNG bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=[served])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"the image declares too many pixels to decode ({exc})") from None
        except UnidentifiedImageError:
            raise ImageError(f"the {served} header is damaged or cut short") from None
        except MemoryError:
            raise
        except Exception as exc:  # a damaged header: Pillow raises OSError, SyntaxError, ValueError, ...
            raise ImageError(f"the {served} header is damaged: {first_line(exc)}") from None


def _format_of(data: bytes, signatures: Mapping[str, tuple[bytes, ...]]) -> str | None:
    return next((name for name, starts in signatures.items() if data.startswith(starts)), None)


def _converted(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode`; 16-bit grey is scaled to 8 bits (Pillow's own convert would clip it at 255)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    try:
        return image.convert(mode)
    except MemoryError:
        raise
    except Exception as exc:  # a mode Pillow cannot convert (a LAB or CMYK oddity)
        raise ImageError(f"the image's {image.mode} pixels cannot be converted to {mode}: "
                         f"{first_line(exc)}") from None


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
