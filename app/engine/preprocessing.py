"""Bytes -> validated PIL image -> model-resolution tensor. Runs on any thread (never the model's).

Choices (documented in docs/API.md): the first frame of animated/multi-page files is scored; EXIF
orientation is applied; transparency is composited over black; 16-bit and float images are scaled to
8 bits by their nominal range; the largest centred square is taken and resized with bicubic
antialiasing (how the training data was made).
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 4096 * 4096
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    min_side: int = 8
    max_aspect_ratio: float = 32.0


@dataclass
class PreparedImage:
    """An image ready for the engine: (C, H, W) float32 in [-1, 1] at the model's resolution."""

    tensor: torch.Tensor
    source_size: tuple[int, int]  # (width, height) after EXIF orientation, before cropping
    digest: bytes = field(default=b"", repr=False)  # content hash: seeds per-image noise


def decode_image(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Decode and validate one image; raise InvalidInput / UnsupportedMediaType / PayloadTooLarge."""
    limits = limits or DecodeLimits()
    if not data:
        raise InvalidInput("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image dimensions exceed the pixel cap of {limits.max_pixels}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("not an image in a supported format") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"undecodable image: {exc}") from exc
    if image.format not in limits.allowed_formats:
        raise UnsupportedMediaType(
            f"image format {image.format} not accepted (allowed: {', '.join(limits.allowed_formats)})"
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height}, over the pixel cap of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise InvalidInput(f"image is {width}x{height}; both sides must be at least {limits.min_side} px")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidInput(f"image aspect ratio {width}x{height} exceeds {limits.max_aspect_ratio:g}:1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            return to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge("image exceeds the pixel cap") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InvalidInput(f"truncated or corrupt image: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else top
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare(image: Image.Image, size: int, channels: int = 3) -> PreparedImage:
    """Centre square crop, bicubic resize to ``size``, scale to [-1, 1]."""
    source_size = image.size
    square = center_square(image)
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    if channels == 1:
        square = square.convert("L")
    arr = np.asarray(square, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    digest = hashlib.sha256(arr.tobytes()).digest()
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return PreparedImage(tensor=tensor.contiguous(), source_size=source_size, digest=digest)


def load_image_file(
    path: str, size: int, channels: int = 3, limits: DecodeLimits | None = None
) -> PreparedImage:
    with open(path, "rb") as fh:
        return prepare(decode_image(fh.read(), limits), size, channels)
