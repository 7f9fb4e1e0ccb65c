"""Property-based tests (hypothesis) of decoding and preprocessing, the code every upload goes through.

* Any bytes - random, or a valid file of any allowed format with bytes overwritten and/or cut off - give
  either a PreparedImage of the model's shape with finite values in [-1, 1], or one of our InvalidInput
  errors (400 / 413 / 415). Never another exception (which would be a 500).
* Any valid image of any PIL mode, size, format and EXIF orientation gives the model's shape, upright
  (the source size is the displayed one), and the same bytes always give the same tensor and digest.

Derandomized, so CI runs the same examples every time; docs/RELIABILITY.md has the counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.engine.preprocessing import DecodeLimits, PreparedImage, decode_image, prepare
from app.errors import InvalidInput
from tests import hostile_media as media

SIZE = 32  # the shipped model's resolution
LIMITS = DecodeLimits(max_pixels=512 * 512)


def fast(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


# (mode, formats that store it); every format is one the service accepts by default
MODES: dict[str, tuple[str, ...]] = {
    "1": ("PNG", "BMP", "TIFF"),
    "L": ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"),
    "LA": ("PNG", "TIFF"),
    "P": ("PNG", "BMP", "GIF", "TIFF"),
    "RGB": ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"),
    "RGBA": ("PNG", "TIFF", "WEBP"),
    "CMYK": ("JPEG", "TIFF"),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
    "YCbCr": ("JPEG", "TIFF"),
}
EXIF_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP")
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode(data: bytes) -> PreparedImage:
    return prepare(decode_image(data, LIMITS), SIZE)


def check_prepared(prepared: PreparedImage) -> None:
    tensor = prepared.tensor
    assert tensor.shape == (3, SIZE, SIZE) and str(tensor.dtype) == "torch.float32"
    assert bool(tensor.isfinite().all()) and float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0
    assert len(prepared.digest) == 32


def decode_or_refuse(data: bytes) -> None:
    try:
        prepared = decode(data)
    except InvalidInput:
        return
    check_prepared(prepared)


@st.composite
def images(draw: st.DrawFn) -> tuple[Image.Image, str]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width = draw(st.integers(8, 160))
    height = draw(st.integers(max(8, -(-width // 32)), min(160, width * 32)))
    seed = draw(st.integers(0, 2**16))
    rgb = media.pattern(width, height, seed)
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(rgb.convert("L"), dtype=np.float64)
        scale = {"I;16": 257.0, "I": 4000.0, "F": 1 / 255}[mode]
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray((gray * scale).astype(dtype))
        if mode == "I;16" and image.mode != "I;16":
            image = image.convert("I;16")
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=draw(st.integers(2, 255)))
    else:
        image = rgb.convert(mode)
    assert image.mode == mode, (image.mode, mode)  # the table is what is really tested
    return image, fmt


@st.composite
def encoded(draw: st.DrawFn) -> bytes:
    image, fmt = draw(images())
    return media.encode(image, fmt)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid file with up to 8 bytes overwritten (mostly near the header) and maybe cut short."""
    data = bytearray(draw(encoded()))
    for _ in range(draw(st.integers(0, 8))):
        span = len(data) if draw(st.booleans()) else min(len(data), 128)
        data[draw(st.integers(0, span - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@fast(200)
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_get_our_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata it skips in damaged files
@fast(300)
@given(damaged())
def test_damaged_files_decode_or_get_our_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.parametrize(
    "data",
    [media.png_declaring(60_000, 60_000), media.tiff_declaring(40_000, 40_000), media.png_text_bomb()],
    ids=["png-bomb", "tiff-bomb", "text-bomb"],
)
def test_bombs_get_our_error(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode(data)


@fast(150)
@given(images(), st.sampled_from([None, 1, 2, 3, 4, 5, 6, 7, 8]))
def test_any_valid_image_of_any_mode_gets_the_model_shape_upright(
    drawn: tuple[Image.Image, str], orientation: int | None
) -> None:
    image, fmt = drawn
    options: dict[str, object] = {}
    if orientation is not None and fmt in EXIF_FORMATS:
        exif = Image.Exif()
        exif[media.EXIF_ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    else:
        orientation = None
    data = media.encode(image, fmt, **options)
    prepared = decode(data)
    check_prepared(prepared)
    width, height = image.size
    upright = (height, width) if orientation in TRANSPOSING else (width, height)
    assert prepared.source_size == upright
    again = decode(data)
    assert bool((again.tensor == prepared.tensor).all()) and again.digest == prepared.digest
