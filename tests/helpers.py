"""Small shared helpers for tests (not fixtures: conftest.py belongs to the live-server suite)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "model_store" / "celeba32-ref"
# ../shared/data beside the checkout; DDM_TEST_DATA points elsewhere (a clone in another folder).
DATA = Path(os.environ.get("DDM_TEST_DATA", REPO.parent / "shared" / "data"))


# CI (``CI=true``, as .ci/run runs): a test whose tool or data is missing fails; locally it skips.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    """Skip locally, fail in CI: a green CI run must mean every test ran (docs/TESTING.md)."""
    if IN_CI:
        pytest.fail(
            f"{what} (CI=true: missing tools or data fail the run instead of skipping)", pytrace=False
        )
    pytest.skip(what)


def require_tool(*names: str, hint: str = "") -> str:
    """The path of the first of ``names`` on PATH; skipped locally, failed in CI when there is none."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    missing(f"{' or '.join(names)} not installed{f' ({hint})' if hint else ''}")


def data_images(name: str, n: int, start: int = 0) -> list[Path]:
    """The first n images of a ../shared/data set (sorted), or [] when the data is not present."""
    folder = DATA / name
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.png"))[start : start + n]


def require_data(name: str, n: int, start: int = 0) -> list[Path]:
    """Exactly n images of a ../shared/data set (``DDM_TEST_DATA``); skipped locally, failed in CI when the
    set is missing or smaller."""
    found = data_images(name, n, start)
    if len(found) < n:
        missing(f"needs {n} images of {DATA / name} from #{start} (found {len(found)}; set DDM_TEST_DATA)")
    return found


def until(condition: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.002) -> None:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` seconds (never a hang
    until pytest's 600 s limit)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- Prometheus text exposition -------------------------------------------------------------------------
def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics text, labels matched exactly (in any order).

    A labelled series of a declared family that has never been touched reads 0 (prometheus_client creates
    a label set on first use); anything else that is absent fails, naming the series: a renamed metric or
    a dropped unlabelled series must not read as zero."""
    want = {k: str(v) for k, v in labels.items()}
    declared = False
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            declared |= name in (
                family,
                *(family + suffix for suffix in ("_total", "_bucket", "_count", "_sum")),
            )
            continue
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sample, _, label_text = series.partition("{")
        if sample != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if got == want:
            return float(value)
    if declared and want:
        return 0.0
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(want.items()))
    raise AssertionError(
        f"/metrics has no series {name}{{{shown}}}" + ("" if declared else " (nor its family)")
    )


def png_bytes(array: np.ndarray | None = None, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> bytes:
    if array is None:
        rng = np.random.default_rng(0)
        channels = {"RGB": 3, "L": 1}[mode]
        array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_model(folder: Path, safe: bool = True, flat: bool = False, sample_size: int = 16) -> Path:
    """A randomly initialised diffusers UNet + linear-schedule DDPM scheduler, saved like a hub folder."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")
    unet_dir = folder if flat else folder / "unet"
    unet.save_pretrained(unet_dir, safe_serialization=safe)
    scheduler.save_pretrained(folder if flat else folder / "scheduler")
    return folder
