"""What ``ddm-anomaly score`` writes: one row per image as JSON lines, CSV or an aligned table, and the
heat-map overlays (the map the service returns, composited over the image)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageOps
from tqdm import tqdm

from app.engine.calibration.profile import Profile
from app.engine.explain import heatmap_png, verdict_floor
from app.engine.preprocessing import PreparedImage
from app.engine.types import ImageStats, Verdict

FORMATS = ("jsonl", "csv", "table")
COLUMNS = ("image", "score", "threshold", "is_anomaly", "percentile", "p_value", "error")


def verdict_row(image: str, verdict: Verdict) -> dict[str, Any]:
    """A verdict with the digits that mean something: scores are -log densities whose spread between normal
    images is several units, so three decimals are plenty; p-values are multiples of 1/(n + 1)."""
    return {
        "image": image,
        "score": None if verdict.score is None else round(verdict.score, 3),
        "threshold": round(verdict.threshold, 3),
        "is_anomaly": verdict.is_anomaly,
        "percentile": round(verdict.percentile, 1),
        "p_value": round(verdict.p_value, 4),
    }


class ReportWriter:
    """Rows out as they come (JSON lines, CSV) or all at the end (a table needs every width). Lines go
    through ``tqdm.write`` so a progress bar on the same terminal is redrawn below them, not torn."""

    def __init__(self, fmt: str, out: TextIO) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        self.fmt, self.out = fmt, out
        self.rows: list[dict[str, Any]] = []
        if fmt == "csv":
            self._emit(",".join(COLUMNS))

    def _emit(self, text: str) -> None:
        tqdm.write(text, file=self.out)

    def row(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._emit(json.dumps(row))
        elif self.fmt == "csv":
            buf = io.StringIO()
            csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="").writerow(row)
            self._emit(buf.getvalue())
        else:
            self.rows.append(row)

    def close(self) -> None:
        if self.fmt == "table" and self.rows:
            self.out.write(format_table(self.rows) + "\n")
        self.out.flush()


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns: image, score, threshold, verdict, percentile, p-value (an unreadable file's row
    says why in the verdict column)."""
    header = ("image", "score", "threshold", "verdict", "percentile", "p-value")
    cells = [header]
    for r in rows:
        if "error" in r:
            cells.append((r["image"], "-", "-", f"error: {r['error']}", "-", "-"))
            continue
        score = "inf" if r["score"] is None else f"{r['score']:.2f}"
        verdict = "ANOMALY" if r["is_anomaly"] else "normal"
        cells.append(
            (
                r["image"],
                score,
                f"{r['threshold']:.2f}",
                verdict,
                f"{r['percentile']:.1f}",
                f"{r['p_value']:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = {1, 2, 4, 5}
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


class OverlayWriter:
    """``<folder>/<image stem>.heatmap.png``: the image with its heat map on the profile's colour scale
    over the scored region (explain.heatmap_png); a name repeated across input folders is prefixed with its
    folder's name."""

    def __init__(self, folder: Path, profile: Profile) -> None:
        self.folder, self.profile = folder, profile
        self.used: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, source: Path, prepared: PreparedImage, stats: ImageStats, verdict: Verdict) -> Path:
        image = ImageOps.exif_transpose(Image.open(source)).convert("RGBA")
        png = heatmap_png(
            stats.heatmap,
            prepared.source_size,
            box=prepared.crop_box,
            calibration=self.profile.heatmap,
            floor=verdict_floor(self.profile, verdict),
            opacity=0.6,
        )
        overlay = Image.open(io.BytesIO(png))
        base = image.resize(overlay.size, Image.Resampling.BILINEAR)
        stem, n = source.stem, 1
        if f"{stem}.heatmap.png" in self.used:  # the same name in another folder: say which folder
            stem = f"{source.parent.name}-{source.stem}"
        name = f"{stem}.heatmap.png"
        while name in self.used:
            n += 1
            name = f"{stem}-{n}.heatmap.png"
        self.used.add(name)
        path = self.folder / name
        Image.alpha_composite(base, overlay).convert("RGB").save(path)
        return path
