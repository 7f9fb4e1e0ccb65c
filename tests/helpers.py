"""Small shared helpers for tests (not fixtures: conftest.py belongs to the live-server suite)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "model_store" / "celeba32-ref"
# ../shared/data beside the checkout; DDM_TEST_DATA points elsewhere (a clone in another folder).
DATA = Path(os.environ.get("DDM_TEST_DATA", REPO.parent / "shared" / "data"))


def data_images(name: str, n: int, start: int = 0) -> list[Path]:
    """The first n images of a ../shared/data set (sorted), or [] when the data is not present."""
    folder = DATA / name
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.png"))[start : start + n]


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
