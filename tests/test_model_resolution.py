"""Resolution and preprocessing belong to the model: the sidecar's input transform
(app/engine/model/sidecar.py) decides how an upload becomes the model's input, 32, 64 and 256 px models score
through the same service, and heat maps come back at the upload's size over the region the model saw.

The crops follow torchvision on PIL images; the boxes pinned here were checked against torchvision 0.28
(``CenterCrop(140)`` + ``Resize((32, 32), BILINEAR)`` + ``ToTensor`` + ``Normalize(.5, .5)``, and DDIM's
``F.crop(57, 25, 128, 128)`` + ``Resize(64)``: max |diff| 0.0 on nine image sizes, padded ones included).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.client import AnomalyClient
from app.engine.engine import Engine
from app.engine.explain import heatmap_png
from app.engine.model.sidecar import InputTransform, ModelSidecar
from app.engine.preprocessing import center_crop_box, crop_box, prepare
from tests.conftest import LiveServer
from tests.helpers import make_tiny_model, missing

CHECKPOINTS = Path(__file__).resolve().parent.parent.parent / "shared" / "checkpoints"
CELEBAHQ_256 = CHECKPOINTS / "diffusers-ddpm-celebahq-256"
DIFFPATH_CELEBA = InputTransform("center_crop_resize", "bilinear", crop=140)
DDIM_CELEBA = InputTransform("box_crop_resize", "bilinear", crop=128, left=25, top=57)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def alpha(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG" and image.mode == "RGBA"
    return np.asarray(image)[..., 3]


# --- the transforms ----------------------------------------------------------------------------------------
def test_default_transform_is_todays_centre_square_bicubic() -> None:
    image = photo(50, 37)
    prepared = prepare(image, 16)
    side = 37
    left, top = (50 - side) // 2, 0
    square = image.crop((left, top, left + side, top + side)).resize(
        (16, 16), Image.Resampling.BICUBIC, reducing_gap=None
    )
    expected = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(prepared.tensor, expected)
    assert prepared.crop_box == (6, 0, 43, 37) and prepared.source_size == (50, 37)


def test_torchvision_centre_crop_boxes() -> None:
    assert center_crop_box(178, 218, 140) == (19, 39, 159, 179)  # a CelebA aligned image
    assert center_crop_box(179, 219, 140) == (20, 40, 160, 180)  # round(19.5) = 20, as torchvision
    assert center_crop_box(181, 221, 140) == (20, 40, 160, 180)  # round(20.5) = 20 (Python rounds to even)
    assert center_crop_box(100, 200, 140) == (-20, 30, 120, 170)  # zero padding left and right
    assert center_crop_box(101, 99, 140) == (-19, -20, 121, 120)  # the larger half of the padding after
    assert crop_box(DDIM_CELEBA, 178, 218) == (25, 57, 153, 185)


def test_diffpath_and_ddim_celeba_transforms() -> None:
    image = photo(178, 218, seed=1)
    diffpath = prepare(image, 32, transform=DIFFPATH_CELEBA)
    crop = image.crop((19, 39, 159, 179)).resize((32, 32), Image.Resampling.BILINEAR)
    assert torch.equal(
        diffpath.tensor, torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1) / 127.5 - 1
    )
    ddim = prepare(image, 64, transform=DDIM_CELEBA)
    crop = image.crop((25, 57, 153, 185)).resize((64, 64), Image.Resampling.BILINEAR)
    assert torch.equal(ddim.tensor, torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1) / 127.5 - 1)
    assert ddim.tensor.shape == (3, 64, 64) and diffpath.digest != prepare(image, 32).digest


def test_a_crop_larger_than_the_image_is_zero_padded() -> None:
    white = Image.new("RGB", (40, 140), (255, 255, 255))
    prepared = prepare(white, 140, transform=DIFFPATH_CELEBA)  # no resize: the crop is the model's size
    assert prepared.crop_box == (-50, 0, 90, 140)
    assert (prepared.tensor[:, :, :50] == -1).all() and (prepared.tensor[:, :, 50:90] == 1).all()
    assert (prepared.tensor[:, :, 90:] == -1).all()


def test_heat_map_lies_over_the_region_the_model_saw() -> None:
    heat = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    a = alpha(heatmap_png(heat, (178, 218), box=(19, 39, 159, 179)))
    assert a.shape == (218, 178)
    assert (a[39:179, 19:159] > 0).all() and a.sum() == a[39:179, 19:159].sum()
    # a padded box is cut to the image; a scaled-down canvas keeps the box in proportion
    a = alpha(heatmap_png(heat, (100, 200), box=(-20, 30, 120, 170)))
    assert (a[30:170, :] > 0).all() and not a[:30].any() and not a[170:].any()
    a = alpha(heatmap_png(heat, (400, 800), box=(100, 200, 300, 400), max_side=400))
    assert a.shape == (400, 200) and (a[100:200, 50:150] > 0).all() and a.sum() == a[100:200, 50:150].sum()
    # no box: today's centred square
    a = alpha(heatmap_png(heat, (120, 60)))
    assert (a[:, 30:90] > 0).all() and not a[:, :30].any() and not a[:, 90:].any()


def test_the_engine_takes_the_transform_from_the_model_folder(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", sample_size=32)
    ModelSidecar(input_transform=DIFFPATH_CELEBA).write(folder)
    engine = Engine(folder, device="cpu", runtime="torch")
    engine.load(warmup_batch=0)
    assert engine.input_transform == DIFFPATH_CELEBA
    image = photo(178, 218, seed=2)
    prepared = engine.decode(png(image))
    assert prepared.crop_box == (19, 39, 159, 179) and prepared.tensor.shape == (3, 32, 32)
    assert torch.equal(prepared.tensor, prepare(image, 32, transform=DIFFPATH_CELEBA).tensor)
    plain = Engine(make_tiny_model(tmp_path / "plain", sample_size=32), device="cpu", runtime="torch")
    plain.load(warmup_batch=0)
    assert plain.input_transform == InputTransform() and plain.decode(png(image)).crop_box == (
        0,
        20,
        178,
        198,
    )


# --- 32, 64 and 256 px models through one live service ---------------------------------------------------
def narrow_celebahq_256(folder: Path) -> Path:
    """google/ddpm-celebahq-256's architecture with narrow channels and random weights, as a diffusers folder
    (same six levels, attention at 16 x 16, 256 px, linear 1000-step schedule)."""
    from diffusers import DDPMScheduler, UNet2DModel

    config = {k: v for k, v in json.loads((CELEBAHQ_256 / "config.json").read_text()).items() if k[0] != "_"}
    config.update(block_out_channels=[8, 8, 16, 16, 32, 32], norm_num_groups=8)
    torch.manual_seed(0)
    UNet2DModel(**config).save_pretrained(folder / "unet")
    scheduler = json.loads((CELEBAHQ_256 / "scheduler_config.json").read_text())
    DDPMScheduler.from_config(scheduler).save_pretrained(folder / "scheduler")
    return folder


def serve_and_explain(
    live_server: Callable[..., LiveServer], folder: Path, upload: Image.Image, env: dict[str, str]
) -> tuple[int, np.ndarray]:
    """Start the service on ``folder``, calibrate a profile through the API, score ``upload`` with a heat map;
    returns the model's sample size and the heat map's alpha channel."""
    server = live_server(
        {"DDM_MODEL_DIR": str(folder), "DDM_STEPS": "2", "DDM_ALLOW_OPEN_PROFILE_CREATION": "true", **env}
    )
    with AnomalyClient(server.url, timeout=300.0) as client:
        normals = [png(photo(64 + 3 * i, 80, seed=10 + i)) for i in range(10)]
        summary = client.create_profile("normal", normals)
        assert summary.n_reference == 10
        result = client.score([png(upload)], profile="normal", explain=True, features=True).results[0]
        size = client.models().models[0].sample_size
    assert result.score is not None and result.heatmap_png and result.features is not None
    assert len(result.features.timesteps) == 2 and result.features.timesteps[0] == 0
    return size, alpha(result.heatmap_png)


@pytest.mark.slow
@pytest.mark.live
def test_256_px_celebahq_architecture(live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    if not CELEBAHQ_256.is_dir():
        missing(f"checkpoint fixtures {CELEBAHQ_256} not present")
    folder = narrow_celebahq_256(tmp_path / "celebahq-256-narrow")
    size, a = serve_and_explain(live_server, folder, photo(300, 200), {"DDM_RUNTIME": "torch"})
    assert size == 256
    assert a.shape == (200, 300) and (a[:, 50:250] > 0).all() and not a[:, :50].any() and not a[:, 250:].any()


@pytest.mark.slow
@pytest.mark.live
def test_64_px_model_with_ddims_celeba_crop(live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "ddim-64", sample_size=64)
    ModelSidecar(input_transform=DDIM_CELEBA).write(folder)
    size, a = serve_and_explain(live_server, folder, photo(178, 218), {})
    assert size == 64 and a.shape == (218, 178)
    assert (a[57:185, 25:153] > 0).all() and a.sum() == a[57:185, 25:153].sum()


@pytest.mark.slow
@pytest.mark.live
def test_32_px_model_with_diffpaths_celeba_crop(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    folder = make_tiny_model(tmp_path / "diffpath-32", sample_size=32)
    ModelSidecar(input_transform=DIFFPATH_CELEBA).write(folder)
    size, a = serve_and_explain(live_server, folder, photo(120, 100), {"DDM_RUNTIME": "torch"})
    assert size == 32 and a.shape == (100, 120)
    # CenterCrop(140) of 120 x 100 pads: the region is (-10, -20, 130, 120), i.e. all of the upload
    assert (a > 0).all()
