"""Bytes -> validated PIL image -> model-resolution tensor. Runs on any thread (never the model's).

Choices (documented in docs/API.md): the first frame of animated/multi-page files is scored; EXIF
orientation is applied; transparency is composited over black; 16-bit and float images are scaled to
8 bits by their nominal range.

Geometry belongs to the model: its folder's sidecar (``ddm_anomaly.json``, ``InputTransform``) says how its
training images were made, and a folder without one gets the default, the largest centred square resized
with bicubic antialiasing (how this project's training data was made). The crops follow torchvision:
``center_crop_resize`` is ``CenterCrop(crop)`` (zero padding when the image is smaller, offsets rounded as
torchvision rounds them) and ``box_crop_resize`` is ``F.crop(top, left, crop, crop)``. The resize is Pillow's
``Image.resize`` with the sidecar's filter, which is exactly what torchvision's ``Resize`` runs on a PIL image
(Pillow's filters widen their support when shrinking: antialiased), so DiffPath's ``CenterCrop(140) ->
Resize(32, bilinear)`` and DDIM's ``Crop(57, 25, 128) -> Resize(64)`` are reproduced pixel for pixel. The
last step, uint8 -> [-1, 1], is ``x / 127.5 - 1`` (torchvision's ``ToTensor`` + ``Normalize(.5, .5)`` is
``(x / 255 - 0.5) / 0.5``: equal up to one float32 rounding, never at -1, 0 or 1).
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from app.engine.model.sidecar import InputTransform
from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_TRANSFORM = InputTransform()  # largest centred square, bicubic
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 4096 * 4096
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    min_side: int = 8
    max_aspect_ratio: float = 32.0
    # A progressive JPEG is decoded once per scan: real encoders write about 10 (mozjpeg up to ~20, an EXIF
    # thumbnail a few more), while a crafted file repeats a scan thousands of times to cost seconds of CPU
    # per image. Counted from the markers before decoding.
    max_jpeg_scans: int = 64


@dataclass
class PreparedImage:
    """An image ready for the engine: (C, H, W) float32 in [-1, 1] at the model's resolution."""

    tensor: torch.Tensor
    source_size: tuple[int, int]  # (width, height) after EXIF orientation, before cropping
    digest: bytes = field(default=b"", repr=False)  # content hash: seeds per-image noise
    # (left, top, right, bottom) of the region of the source the model saw, in source pixels; may reach
    # outside the image (torchvision's zero padding). None = the largest centred square.
    crop_box: tuple[int, int, int, int] | None = None


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
    # MPO (what many phone cameras write) is JPEG with more frames after the first: scored as JPEG
    kind = "JPEG" if image.format == "MPO" else image.format
    if kind not in limits.allowed_formats:
        raise UnsupportedMediaType(
            f"image format {image.format} not accepted (allowed: {', '.join(limits.allowed_formats)})"
        )
    if kind == "JPEG":
        scans = jpeg_scan_count(data)
        if scans > limits.max_jpeg_scans:
            raise InvalidInput(f"JPEG with {scans} scans; at most {limits.max_jpeg_scans} are decoded")
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
            turn = _ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation, 1))
            rgb = to_rgb(image)  # converted before it is turned: the turn copies 8-bit RGB, not the source
            if rgb is not image:
                image.close()  # its pixels are not needed past here
            return rgb.transpose(turn) if turn is not None else rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge("image exceeds the pixel cap") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InvalidInput(f"truncated or corrupt image: {exc}") from exc


def jpeg_scan_count(data: bytes) -> int:
    """Start-of-scan markers (FF DA) in the file: entropy-coded data stuffs every FF with 00, so FF DA only
    occurs as a marker (of the image or of an embedded thumbnail): an upper bound on the scans decoded."""
    return data.count(b"\xff\xda")


def declared_pixels(data: bytes) -> int:
    """Width x height from the header alone (0 when unreadable: decoding then names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # any header that PIL cannot read; decode_image refuses it with the right error
        return 0
    return int(width) * int(height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Deep (16-bit, 32-bit, float) and transparent images are converted a band of rows at a time: their
    conversion makes float64 arrays or RGBA copies of the whole image (a 4096² 16-bit PNG cost +476 MiB
    converted whole), a band costs a few MiB. Every step is per pixel, so the result is the same.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in DEEP_MODES:
        peak = float(np.max([np.asarray(band, dtype=np.float64).max(initial=0) for band in _bands(image)]))
        top = 65535.0 if mode.startswith("I;16") or peak > 255 else 255.0
        if mode == "F":
            top = 1.0 if peak <= 1.0 else top
        return _banded(image, lambda band: _scaled_to_8_bits(band, top))
    if mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):
        return _banded(image, _over_black)
    return image.convert("RGB")


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
BAND_ROWS = 128
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> the turn that makes the image upright (as ImageOps.exif_transpose)


def _bands(image: Image.Image) -> Iterator[Image.Image]:
    width, height = image.size
    for top in range(0, height, BAND_ROWS):
        yield image.crop((0, top, width, min(height, top + BAND_ROWS)))


def _banded(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    out = Image.new("RGB", image.size)
    for index, band in enumerate(_bands(image)):
        out.paste(convert(band), (0, index * BAND_ROWS))
    return out


def _scaled_to_8_bits(band: Image.Image, top: float) -> Image.Image:
    arr = np.asarray(band, dtype=np.float64)
    arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8).convert("RGB")


def _over_black(band: Image.Image) -> Image.Image:
    """Transparency composited over black."""
    rgba = band.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def center_square(image: Image.Image) -> Image.Image:
    return image.crop(center_square_box(*image.size))


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop(crop)``'s box in source pixels: a side longer than the crop is cut at
    ``round((side - crop) / 2)`` (Python's rounding, as torchvision); a shorter one is zero-padded by
    ``(crop - side) // 2`` before (the larger half after), i.e. the box starts at minus that."""

    def start(side: int) -> int:
        return -((crop - side) // 2) if crop > side else round((side - crop) / 2.0)

    left, top = start(width), start(height)
    return left, top, left + crop, top + crop


def crop_box(transform: InputTransform, width: int, height: int) -> tuple[int, int, int, int]:
    """The source region an input transform keeps, (left, top, right, bottom)."""
    if transform.kind == "center_square_resize":
        return center_square_box(width, height)
    assert transform.crop is not None
    if transform.kind == "center_crop_resize":
        return center_crop_box(width, height, transform.crop)
    if transform.kind == "box_crop_resize":
        assert transform.left is not None and transform.top is not None
        return transform.left, transform.top, transform.left + transform.crop, transform.top + transform.crop
    raise ValueError(f"unknown input transform {transform.kind!r}")


def prepare(
    image: Image.Image, size: int, channels: int = 3, transform: InputTransform | None = None
) -> PreparedImage:
    """Crop as the model's input transform says (default: the largest centred square), resize to ``size``
    with its filter (default bicubic), scale to [-1, 1]."""
    transform = transform or DEFAULT_TRANSFORM
    source_size = image.size
    box = crop_box(transform, *source_size)
    # Pillow fills the part of a box outside the image with zeros: torchvision's pad(fill=0) then crop.
    # A box that is the whole image is not copied (a 4096² RGB image is 64 MiB in Pillow).
    square = image if box == (0, 0, *source_size) else image.crop(box)
    if square.size != (size, size):
        square = square.resize((size, size), RESAMPLING[transform.interpolation], reducing_gap=None)
    if channels == 1:
        square = square.convert("L")
    arr = np.asarray(square, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    digest = hashlib.sha256(arr.tobytes()).digest()
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return PreparedImage(tensor=tensor.contiguous(), source_size=source_size, digest=digest, crop_box=box)


def load_image_file(
    path: str,
    size: int,
    channels: int = 3,
    limits: DecodeLimits | None = None,
    transform: InputTransform | None = None,
) -> PreparedImage:
    with open(path, "rb") as fh:
        return prepare(decode_image(fh.read(), limits), size, channels, transform)
