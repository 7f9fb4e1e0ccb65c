"""The accuracy ablation runs end to end on a tiny random UNet and random images (no AUROC is asserted: a
random model detects nothing; the real figures are in docs/ACCURACY.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import make_tiny_model
from tests.test_benchmarks import _load


def test_ablation_reports_every_aggregation_and_fit_sizes(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    for name, n in (("celeba", 40), ("cifar10", 8), ("mnist", 8), ("dtd", 8), ("imagenet", 8)):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    out = tmp_path / "ablation.json"
    args = ["--model", str(model), "--data", str(tmp_path / "data"), "--fit-limit", "20", "--limit", "8"]
    args += ["--walks", "3:1.0:ddim", "--fit-sizes", "12", "--threads", "1", "--json", str(out)]
    assert _load("accuracy_ablation").main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    walk_rows = [r for r in rows if "fit_size" not in r]
    assert {r["aggregation"] for r in walk_rows} == {"sum", "per-step", "per-step-centre"}
    assert len(walk_rows) == 3 * (8 + 5)  # 8 variants x 3 aggregations, + the density grid of the default
    fit_rows = [(r["aggregation"], r["covariance_reg"], r["fit_size"]) for r in rows if "fit_size" in r]
    assert fit_rows == [
        ("sum", 1e-4, 12),
        ("per-step", 1e-4, 12),
        ("per-step", 0.1, 12),
        ("per-step-centre", 0.1, 12),
    ]
    assert all(0.0 <= r[s] <= 1.0 for r in rows for s in ("cifar10", "mnist", "dtd", "imagenet"))
