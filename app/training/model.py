"""Build or load the UNet and noise schedule that training starts from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from app.errors import InvalidInput


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a fresh model. ``attention_resolutions`` are the feature-map sizes (in pixels) whose
    blocks get self-attention, e.g. (8,) at 32 px puts attention in the third level, like celeba32-ref."""

    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.1
    attention_head_dim: int = 8


def build_unet(spec: UNetSpec) -> UNet2DModel:
    """A randomly initialised ``UNet2DModel`` (fp32). Group-norm groups = gcd(32, channels...)."""
    if not spec.channels:
        raise InvalidInput("channels must name at least one level")
    if spec.resolution % (2 ** (len(spec.channels) - 1)):
        raise InvalidInput(f"resolution {spec.resolution} is not divisible by 2^(levels-1)")
    sizes = [spec.resolution // 2**i for i in range(len(spec.channels))]
    attn = [s in spec.attention_resolutions for s in sizes]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=spec.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=True,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=math.gcd(32, *spec.channels),
        dropout=spec.dropout,
    )


def default_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The project's training schedule: cosine (``squaredcos_cap_v2``), epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        variance_type="fixed_small",
    )


def load_model_dir(model_dir: Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a model folder as ``serve`` finds it (``unet/`` + ``scheduler/`` or flat: the one reader's
    ``find_layout``) as an fp32 UNet (fp16 files are upcast) and its schedule as a ``DDPMScheduler``.

    Training and sampling call the UNet the plain diffusers way (integer timesteps, every output channel is
    epsilon), so a folder whose sidecar says otherwise (an imported improved-diffusion model) is refused
    here with that reason rather than trained wrongly."""
    from app.engine.model.loading import ModelLoadError, find_layout
    from app.engine.model.sidecar import ModelSidecar, SidecarError, read_sidecar

    model_dir = Path(model_dir)
    try:
        unet_dir, scheduler_file = find_layout(model_dir)
        sidecar = read_sidecar(model_dir)
    except (ModelLoadError, SidecarError) as exc:
        raise InvalidInput(str(exc)) from exc
    plain = ModelSidecar()
    if (sidecar.timestep_scale, sidecar.epsilon_channels) != (plain.timestep_scale, plain.epsilon_channels):
        raise InvalidInput(
            f"{model_dir}: its sidecar gives the network timesteps x{sidecar.timestep_scale:g} and "
            f"{sidecar.epsilon_channels or 'all'} epsilon channels; training and sampling here call it the "
            "plain diffusers way (score, calibrate and serve it instead)"
        )
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(scheduler_file.parent)
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise InvalidInput(f"{model_dir}: only epsilon-prediction models are supported")
    return unet, scheduler


def unet_from_config(config: dict[str, Any]) -> UNet2DModel:
    """Rebuild an (uninitialised) UNet from a saved ``unet.config``."""
    return UNet2DModel.from_config(dict(config))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(unet: UNet2DModel) -> dict[str, Any]:
    """The architecture fields ``training.json`` records."""
    cfg = unet.config
    return {
        "resolution": int(cfg.sample_size),
        "channels": list(cfg.block_out_channels),
        "layers_per_block": int(cfg.layers_per_block),
        "down_block_types": list(cfg.down_block_types),
        "parameters": count_parameters(unet),
    }
