"""CPU cost of decoding one upload, per MB on the wire and per megapixel, for each accepted format.

    python benchmarks/decode_cost.py --json benchmarks/results/decode_cost/2026-12-02-cpu.json

What the service runs per image on a decode thread (``DDM_DECODE_THREADS``): ``decode_image`` (header
checks, JPEG scan count, full decode, EXIF orientation, conversion to RGB) and ``prepare`` (crop and
resize to the model's 32 px input, as the shipped model does). Each file is decoded ``--repeats`` times on
one thread; the figure is the median of that thread's CPU time (``time.thread_time``: other processes on a
busy host do not inflate it), with the median wall time beside it.

Three contents per size, because the cost per MB depends on how well a file compresses: ``smooth``
(gradients: the smallest files, so the highest cost per MB: what a client who wants to burn CPU sends),
``photo`` (gradients, shapes and sensor-like noise) and ``noise`` (uniform random: the largest files).
``jpeg-progressive-64`` is the most expensive JPEG we know of that the service decodes: progressive,
padded with copies of its largest scan up to the 64-scan limit or the body cap, whichever comes first
(each copy is decoded again over the whole image; copies of the smallest scan cost far less). Files
over the 20 MiB body cap are measured and flagged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, features

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.preprocessing import DecodeLimits, decode_image, prepare  # noqa: E402

UPLOAD_CAP = 20 * 1024 * 1024
MB = 1024 * 1024


def content(kind: str, side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([255 * x, 255 * y, 127 * (x + y)], -1)
    if kind == "smooth":
        return Image.fromarray(base.astype(np.uint8))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    # photo-like: a few soft blobs over the gradient, plus noise of a few levels (a camera at ISO ~400)
    for _ in range(12):
        cx, cy, r = rng.random(3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.05 * r))
        base += blob[..., None] * rng.uniform(-90, 90, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _jpeg_padded(image: Image.Image, scans: int = 64) -> bytes:
    data = _save(image, "JPEG", quality=90, progressive=True)
    end = data.rfind(b"\xff\xd9")
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    largest = max((data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)), key=len)
    copies = max(0, min(scans - len(starts), (UPLOAD_CAP - len(data)) // len(largest)))
    return data[:end] + largest * copies + data[end:]


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# name -> encoder; every one is an allowed format (DDM_ALLOWED_FORMATS default), MPO decodes as JPEG
ENCODERS: dict[str, Callable[[Image.Image], bytes]] = {
    "png": lambda im: _save(im, "PNG"),
    "jpeg-baseline": lambda im: _save(im, "JPEG", quality=90),
    "jpeg-progressive": lambda im: _save(im, "JPEG", quality=90, progressive=True),
    "jpeg-progressive-64": _jpeg_padded,
    "webp-lossy": lambda im: _save(im, "WEBP", quality=90),
    "webp-lossless": lambda im: _save(im, "WEBP", lossless=True, quality=0, method=0),
    "bmp": lambda im: _save(im, "BMP"),
    "gif": lambda im: _save(im.quantize(256, method=Image.Quantize.MEDIANCUT), "GIF"),
    "tiff-raw": lambda im: _save(im, "TIFF"),
    "tiff-deflate": lambda im: _save(im, "TIFF", compression="tiff_adobe_deflate"),
}


def measure(data: bytes, repeats: int, limits: DecodeLimits) -> tuple[float, float]:
    """Median (thread CPU seconds, wall seconds) of decoding ``data`` as the service does."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        prepare(decode_image(data, limits), 32)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    limits = DecodeLimits()
    rows = []
    for side in args.sides:
        for kind in args.contents:
            image = content(kind, side)
            for name in args.formats:
                data = ENCODERS[name](image)
                cpu, wall = measure(data, args.repeats if side <= 2048 else max(1, args.repeats // 2), limits)
                row = {
                    "format": name,
                    "content": kind,
                    "side": side,
                    "megapixels": round(side * side / 1e6, 3),
                    "bytes": len(data),
                    "cpu_s": round(cpu, 4),
                    "wall_s": round(wall, 4),
                    "cpu_s_per_mb": round(cpu / (len(data) / MB), 4),
                    "cpu_ms_per_megapixel": round(1000 * cpu / (side * side / 1e6), 2),
                    "over_upload_cap": len(data) > UPLOAD_CAP,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format, over the files a client can send (within the body cap): the most CPU one MB of upload
    costs, and the most CPU one image costs."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["format"] for r in rows):
        sendable = [r for r in rows if r["format"] == name and not r["over_upload_cap"]]
        if sendable:
            worst_mb = max(sendable, key=lambda r: r["cpu_s_per_mb"])
            worst_image = max(sendable, key=lambda r: r["cpu_s"])
            out[name] = {
                "max_cpu_s_per_mb": worst_mb["cpu_s_per_mb"],
                "at": f"{worst_mb['content']} {worst_mb['side']}²",
                "max_cpu_s_per_image": worst_image["cpu_s"],
                "image_at": f"{worst_image['content']} {worst_image['side']}², {worst_image['bytes']} bytes",
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[1024, 4096], help="square image sides, px")
    p.add_argument("--contents", nargs="+", default=["smooth", "photo", "noise"])
    p.add_argument("--formats", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument("--repeats", type=int, default=5, help="decodes per file (halved above 2048 px)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    started = time.monotonic()
    rows = run(args)
    result = {
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "command": "python benchmarks/decode_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
            "webp": features.version_module("webp"),
        },
        "conditions": "one decode thread; CPU time of that thread (median of the repeats); the host was "
        "shared with other work, so wall times vary more than CPU times",
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary(rows),
        "rows": rows,
    }
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
