"""Training and sampling on a tiny random UNet and a handful of generated images (fast, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from app.cli import main
from app.errors import InvalidInput
from app.training import TrainConfig, UNetSpec, build_unet, train
from app.training.checkpoint import list_checkpoints, write_model_folder
from app.training.data import BatchSampler, load_image_folders, load_square, to_model_input
from app.training.model import default_scheduler

RES = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two folders: 4 landscape PNGs and 2 portrait JPEGs of smooth random colour fields."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    dirs = [root / "a", root / "b"]
    for d in dirs:
        d.mkdir()
    for i in range(6):
        h, w = (20, 28) if i < 4 else (28, 20)
        base = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        if i < 4:
            img.save(dirs[0] / f"{i:03d}.png")
        else:
            img.save(dirs[1] / f"{i:03d}.jpg", quality=95)
    return dirs


def tiny(images: list[Path], out: Path, **overrides: object) -> TrainConfig:
    cfg = TrainConfig(
        images=images,
        out=out,
        resolution=RES,
        channels=(32, 32),
        attention_resolutions=(8,),
        batch_size=4,
        steps=3,
        checkpoint_every=2,
        sample_every=2,
        sample_n=4,
        sample_steps=2,
        log_every=1,
        progress=False,
        device="cpu",
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def trained(image_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "model"
    return train(tiny(image_dirs, out)), out


def unet_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "unet" / WEIGHTS))


# --- data ------------------------------------------------------------------------------------------------


def test_load_square_keeps_the_centre(tmp_path: Path) -> None:
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:20] = (0, 255, 0)
    arr[:, 20:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = load_square(tmp_path / "x.png", 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[..., 1] > 200).all() and (out[..., 0] < 50).all() and (out[..., 2] < 50).all()


def test_image_cache_counts_and_errors(image_dirs: list[Path], tmp_path: Path) -> None:
    cache = load_image_folders(image_dirs, RES)
    assert cache.pixels.shape == (6, 3, RES, RES) and cache.pixels.dtype == torch.uint8
    assert list(cache.counts.values()) == [4, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput):
        load_image_folders([tmp_path / "empty"], RES)
    with pytest.raises(InvalidInput):
        load_image_folders([tmp_path / "missing"], RES)


def test_batch_sampler_epochs_and_state() -> None:
    sampler = BatchSampler(5, 3, torch.Generator().manual_seed(1))
    first_epoch = torch.cat([sampler.next_indices(), sampler.next_indices()])[:5]
    assert sorted(first_epoch.tolist()) == [0, 1, 2, 3, 4]
    state = {k: v for k, v in sampler.state_dict().items()}
    gen_state = sampler.generator.get_state()
    expected = sampler.next_indices()
    other = BatchSampler(5, 3, torch.Generator())
    other.generator.set_state(gen_state)
    other.load_state_dict(state)
    assert torch.equal(other.next_indices(), expected)


def test_to_model_input_range_and_flip() -> None:
    px = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2) * 10
    x = to_model_input(px, torch.tensor([False, True]))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[1], (px[1].float() / 127.5 - 1).flip(-1))
    assert torch.equal(x[0], px[0].float() / 127.5 - 1)


# --- training --------------------------------------------------------------------------------------------


def test_train_writes_a_diffusers_model(trained) -> None:
    result, out = trained
    assert result.step == 3 and result.stop_reason == "steps"
    assert result.loss_ema is not None and math.isfinite(result.loss_ema)
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.sample_size == RES and list(unet.config.block_out_channels) == [32, 32]
    assert all(t.dtype == torch.float16 for t in unet_tensors(out).values())
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "squaredcos_cap_v2" and sched["prediction_type"] == "epsilon"

    record = json.loads((out / "training.json").read_text())
    assert [d["images"] for d in record["data"]] == [4, 2] and record["images"] == 6
    assert record["steps"] == 3 and record["batch"] == 4 and record["resolution"] == RES
    assert record["channels"] == [32, 32] and record["attention_resolutions"] == [8]
    assert record["ema"] == 0.999 and record["lr"] == 2e-4 and record["seed"] == 0
    assert record["device"] == "cpu" and record["wall_time_s"] > 0 and math.isfinite(record["loss_ema"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 3

    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [2, 3]
    with Image.open(out / "checkpoints" / "step-000002" / "samples.png") as grid:
        assert grid.size == (4 * RES * 2, RES * 2)
    assert (out / "samples.png").is_file()


def test_resume_continues_the_same_run(image_dirs: list[Path], tmp_path: Path) -> None:
    """2 steps, then the same command with --steps 4, equals 4 uncut steps (same weights)."""
    cut, uncut = tmp_path / "cut", tmp_path / "uncut"
    kw = {"checkpoint_every": 0, "sample_every": 0}
    train(tiny(image_dirs, cut, steps=2, **kw))
    resumed = train(tiny(image_dirs, cut, steps=4, **kw))
    assert resumed.start_step == 2 and resumed.step == 4
    train(tiny(image_dirs, uncut, steps=4, **kw))
    a, b = unet_tensors(cut), unet_tensors(uncut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((cut / "training.json").read_text())
    assert record["steps"] == 4 and [s["from_step"] for s in record["sessions"]] == [0, 2]
    # nothing left to do: a third call trains no steps and keeps the model
    again = train(tiny(image_dirs, cut, steps=4, **kw))
    assert again.start_step == again.step == 4


def test_cli_train_init_from_loads_the_weights(image_dirs: list[Path], tmp_path: Path) -> None:
    """--init-from an fp16 folder (like model_store); with lr 0 the saved EMA weights are the init's."""
    init = tmp_path / "init"
    torch.manual_seed(3)
    write_model_folder(build_unet(UNetSpec(RES, (32, 32), 1, ())), default_scheduler(), init, fp16=True)
    out = tmp_path / "out"
    args = ["train", "--images", str(image_dirs[0]), "--out", str(out), "--init-from", str(init)]
    args += ["--steps", "1", "--lr", "0", "--batch-size", "2", "--sample-every", "0", "--no-progress"]
    assert main(args) == 0
    before, after = unet_tensors(init), unet_tensors(out)
    key = "conv_in.weight"
    assert torch.equal(before[key], after[key])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "training.json").read_text())["init_from"] == str(init)
    # a resolution that does not match the model is refused
    bad = ["train", "--images", str(image_dirs[0]), "--out", str(tmp_path / "bad"), "--init-from", str(init)]
    assert main([*bad, "--steps", "1", "--resolution", "32"]) == 2
    assert main(["train", "--images", str(image_dirs[0]), "--out", str(tmp_path / "x")]) == 2  # no budget


def test_cli_sample_writes_a_grid(trained, tmp_path: Path) -> None:
    _, out = trained
    png = tmp_path / "grid.png"
    args = ["sample", "--model", str(out), "--out", str(png), "--n", "5", "--steps", "2", "--columns", "4"]
    assert main(args) == 0
    with Image.open(png) as grid:
        assert grid.size == (4 * RES * 2, 2 * RES * 2) and grid.mode == "RGB"
    assert main(["sample", "--model", str(tmp_path), "--out", str(png)]) == 2  # not a model folder


def test_help_texts() -> None:
    for command in ("train", "sample"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0


def test_training_reads_the_folders_serve_reads(tmp_path: Path) -> None:
    """One reader: a flat folder (config.json + scheduler_config.json side by side) loads for training as it
    does for serve; a folder whose sidecar changes how the network is called is refused with that reason."""
    from app.engine.model.sidecar import ModelSidecar
    from app.training import load_model_dir
    from tests.helpers import make_tiny_model

    flat = make_tiny_model(tmp_path / "flat", flat=True)
    unet, scheduler = load_model_dir(flat)
    assert unet.config.sample_size == 16 and scheduler.config.num_train_timesteps > 1
    nested = make_tiny_model(tmp_path / "nested")
    ModelSidecar(timestep_scale=0.25).write(nested)
    with pytest.raises(InvalidInput, match=r"timesteps x0\.25"):
        load_model_dir(nested)
    with pytest.raises(InvalidInput, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
