"""End to end for imported checkpoints: ``ddm-anomaly import`` -> ``calibrate`` -> ``serve`` ->
``POST /v1/score``, for each tiny original-format fixture of ``../shared/checkpoints`` (skipped locally
without it, failed in CI)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.cli import main
from tests.conftest import LiveServer
from tests.helpers import png_bytes
from tests.test_importers import DD, ID, fixture

pytestmark = [pytest.mark.slow, pytest.mark.live]

PROFILE = "normal"


def import_args(kind: str, out: Path) -> list[str]:
    if kind == "improved-diffusion":
        ckpt, extra = fixture(ID / "tiny.pt"), ["--flags", str(ID / "tiny_flags.json")]
    else:
        ckpt, extra = fixture(DD / "tiny.pth"), ["--config", str(DD / "tiny.yml")]
    return ["import", kind, str(ckpt), *extra, "--out", str(out)]


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[bytes]:
    """Smooth random images (uploads of another size than the model's, as users send)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    images = []
    for i in range(n):
        base = rng.integers(40, 215, 3)
        ramp = np.linspace(-30, 30, size[0])[None, :, None] * rng.uniform(-1, 1, 3)
        array = np.clip(base + ramp + rng.normal(0, 6, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        data = png_bytes(array)
        (folder / f"{i:03d}.png").write_bytes(data)
        images.append(data)
    return images


@pytest.mark.parametrize("kind", ["improved-diffusion", "ddim"])
def test_imported_model_calibrates_and_serves(
    kind: str, tmp_path: Path, live_server: Callable[..., LiveServer], capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    assert main(import_args(kind, model)) == 0
    capsys.readouterr()
    images = write_images(tmp_path / "normal", 14, (48, 40))
    profiles = tmp_path / "profiles"
    code = main(
        ["calibrate", "--model", str(model), "--name", PROFILE, "--images", str(tmp_path / "normal"),
         "--threads", "1", "--batch-size", "8"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    profile_file = Path(summary["profile"])
    assert profile_file.is_file()
    profiles.mkdir()
    profile_file.rename(profiles / profile_file.name)

    server = live_server({"DDM_MODEL_DIR": str(model), "DDM_PROFILES_DIR": str(profiles)})
    info = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    assert PROFILE in json.dumps(info)
    odd = write_images(tmp_path / "odd", 1, (64, 64))[0]
    for data in (images[0], odd):
        response = httpx.post(
            f"{server.url}/v1/score",
            params={"profile": PROFILE},
            content=data,
            headers={"content-type": "image/png"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert isinstance(result["score"], float) and np.isfinite(result["score"])
        assert isinstance(result["is_anomaly"], bool)
