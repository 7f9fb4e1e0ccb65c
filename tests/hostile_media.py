"""Generators of hostile and unusual image files for the reliability tests (built in memory, no fixtures).

Everything is generated from a seed: valid images of every PIL mode the decoder must handle, and the
classic attacks on image decoders - files whose headers declare huge dimensions (decompression bombs), a
PNG text chunk that inflates to 50 MB, truncated and corrupted streams, non-images posing as images.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def pattern(width: int = 40, height: int = 48, seed: int = 0) -> Image.Image:
    """An RGB image with structure (gradients) and noise; different seeds give different images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 6 + seed * 11) % 256, (y * 5 + seed * 3) % 256, ((x + y) * 3) % 256], axis=-1)
    noisy = base + rng.normal(0.0, 12.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png(seed: int = 0, width: int = 40, height: int = 48) -> bytes:
    return encode(pattern(width, height, seed), "PNG")


def frames(fmt: str, count: int = 3) -> bytes:
    """An animated GIF or multi-page TIFF of ``count`` different frames."""
    images = [pattern(seed=i) for i in range(count)]
    out = io.BytesIO()
    options: dict[str, object] = {"duration": 50, "loop": 0} if fmt == "GIF" else {}
    images[0].save(out, format=fmt, save_all=True, append_images=images[1:], **options)
    return out.getvalue()


def first_frame_png(data: bytes) -> bytes:
    """What scoring the first frame means, computed with PIL alone: frame 0 as an RGB PNG."""
    with Image.open(io.BytesIO(data)) as image:
        return encode(image.convert("RGB"), "PNG")


def exif_rotated(fmt: str, upright: Image.Image, **options: object) -> bytes:
    """``upright`` stored rotated by 90 degrees with EXIF orientation 6, which tells viewers to undo it."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 CW to display"; PIL's exif_transpose applies ROTATE_270
    return encode(upright.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif.tobytes(), **options)


def upright_png(data: bytes) -> bytes:
    """The reference for an EXIF-rotated file: decoded by PIL, turned upright by hand, saved as PNG."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return encode(rgb.transpose(Image.Transpose.ROTATE_270), "PNG")


# --- modes ---------------------------------------------------------------------------------------------
def gray16() -> bytes:
    values = (np.arange(48 * 40).reshape(48, 40) * 33 % 65536).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def int32_tiff() -> bytes:
    return encode(Image.fromarray((np.arange(48 * 40).reshape(48, 40) * 1000).astype(np.int32)), "TIFF")


def float_tiff() -> bytes:
    values = np.random.default_rng(0).random((48, 40)).astype(np.float32)
    return encode(Image.fromarray(values), "TIFF")


def palette_transparent() -> bytes:
    image = pattern().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(image, "PNG", transparency=0)


def at_pixel_cap(side: int) -> bytes:
    """A smooth side x side image (compresses to a few KB)."""
    y, x = np.mgrid[0:side, 0:side]
    arr = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(arr), "PNG", optimize=True)


# --- attacks -------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A 69-byte PNG whose header declares width x height (a decompression bomb's header)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + header
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
    return screen + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(pattern(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 64)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", 8 + 64) + b"\0" * 64 + ifd


def png_text_bomb(inflated: int = 50_000_000) -> bytes:
    """A valid small PNG plus a zTXt chunk that inflates to ``inflated`` bytes (about 50 KB on the wire)."""
    good = png()
    end_of_header = 8 + 25
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * inflated, 9))
    return good[:end_of_header] + text + good[end_of_header:]


def png_corrupt_data() -> bytes:
    """The compressed pixel stream scrambled (the chunk CRCs no longer match either)."""
    data = bytearray(png())
    start = data.index(b"IDAT") + 24
    for i in range(start, start + 40):
        data[i] ^= 0x55
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<script>alert(1)</script><rect width="64" height="64"/></svg>'
)
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def random_bytes(n: int = 4096, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).bytes(n)
