"""ermongroup/ddim runner checkpoints (``ckpt.pth``) -> diffusers folder (the DDIM paper's CelebA-64 model).

The file is the list ``Diffusion.train()`` saves: ``[model.state_dict() ('module.' prefixed, DataParallel),
optimizer.state_dict(), epoch, step, ema_helper.state_dict() (only if config.model.ema; no prefix)]``. Like
the original ``sample()``, the raw weights are checked against the config and, when ``model.ema`` is true,
the EMA shadow ``states[-1]`` is the network that is used. The architecture is the repo's YAML config.

What the conversion keeps (verified against the original runner's outputs, tests/test_importers.py):
``cat[sin, cos]`` embedding with ``exp(-ln(10^4) i/(half-1))`` (``flip_sin_to_cos=False, freq_shift=1``),
GroupNorm eps 1e-6, asymmetric (0,1,0,1) padding before a stride-2 convolution (``downsample_padding=0``),
additive time embedding, single-head attention over all channels, ``nin_shortcut`` -> ``conv_shortcut``,
``up.{level}`` numbered from the highest resolution (diffusers' ``up_blocks`` from the lowest), integer
timesteps, and the schedule as the runner's float32 betas so diffusers' float32 abar is the runner's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.model.importers.common import (
    CheckpointImportError,
    Rule,
    apply_rules,
    build_unet,
    copy_rules,
    expected_shapes,
    file_sha256,
    linear_from_1x1,
    load_checkpoint,
    model_card,
    tensor_dict,
    verify_folder,
    write_model_folder,
)
from app.engine.model.importers.improved_diffusion.flags import CELEBA_LICENCE, UNKNOWN_LICENCE
from app.engine.model.sidecar import InputTransform, ModelSidecar

FORMAT = "ddim"
# datasets/__init__.py (CELEBA): Crop(x1=57, x2=185, y1=25, y2=153) = the 128x128 box at top 57, left 25
# (centre x 89, y 121), then Resize(image_size) (torchvision: bilinear), ToTensor
CELEBA_TRANSFORM = InputTransform(kind="box_crop_resize", interpolation="bilinear", crop=128, left=25, top=57)
SCHEDULES = ("linear", "quad", "const", "jsd", "sigmoid")
# the diffusers name of the same schedule, where one exists (trained_betas is what is used either way)
DIFFUSERS_SCHEDULE = {"linear": "linear", "quad": "scaled_linear", "sigmoid": "sigmoid"}


def read_config(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointImportError(f"{path}: not a readable YAML file: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointImportError(
            f"{path}: the config must be a YAML mapping (ermongroup/ddim configs/*.yml)"
        )
    return data


def _get(config: dict[str, Any], dotted: str, kind: type | tuple[type, ...]) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CheckpointImportError(f"config has no {dotted}")
        node = node[part]
    if not isinstance(node, kind) or (isinstance(node, bool) and bool not in _as_tuple(kind)):
        raise CheckpointImportError(f"config {dotted}={node!r}: expected {kind}")
    return node


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


KNOWN = {
    "data": {
        "dataset", "image_size", "channels", "logit_transform", "uniform_dequantization",
        "gaussian_dequantization", "random_flip", "rescaled", "num_workers", "category",
    },
    "model": {
        "type", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
        "var_type", "ema_rate", "ema", "resamp_with_conv",
    },
    "diffusion": {"beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps"},
}  # fmt: skip


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The network ``models/diffusion.py Model(config)`` builds, in plain numbers (checked)."""
    for section, names in KNOWN.items():
        block = config.get(section)
        if not isinstance(block, dict):
            raise CheckpointImportError(f"config has no {section}: section")
        unknown = sorted(set(block) - names)
        if unknown:
            raise CheckpointImportError(f"unknown ermongroup/ddim config keys {section}.{unknown}")
    if _get(config, "model.type", str) != "simple":
        raise CheckpointImportError(f"model.type={config['model']['type']!r}: only 'simple' is supported")
    if not _get(config, "model.resamp_with_conv", bool):
        raise CheckpointImportError(
            "model.resamp_with_conv=false (average-pool resampling) has no UNet2DModel equivalent"
        )
    if _get(config, "data.logit_transform", bool) or not _get(config, "data.rescaled", bool):
        raise CheckpointImportError(
            "the model was trained on inputs other than [-1, 1] (data.logit_transform / data.rescaled); "
            "the engine feeds [-1, 1]"
        )
    channels = _get(config, "model.in_channels", int)
    if _get(config, "model.out_ch", int) != channels or _get(config, "data.channels", int) != channels:
        raise CheckpointImportError(
            "model.out_ch, model.in_channels and data.channels must be equal (epsilon)"
        )
    mult = [int(m) for m in _get(config, "model.ch_mult", list)]
    size = _get(config, "data.image_size", int)
    if not mult or size % (2 ** (len(mult) - 1)):
        raise CheckpointImportError(
            f"data.image_size={size} cannot be halved {len(mult) - 1} times (ch_mult)"
        )
    attn_res = {int(r) for r in _get(config, "model.attn_resolutions", list)}
    levels = [size // 2**level for level in range(len(mult))]
    unreached = sorted(attn_res - set(levels))
    if unreached:
        raise CheckpointImportError(f"model.attn_resolutions {unreached} are never reached by the UNet")
    return {
        "image_size": size,
        "channels": channels,
        "ch": _get(config, "model.ch", int),
        "ch_mult": mult,
        "num_res_blocks": _get(config, "model.num_res_blocks", int),
        "attn_levels": [level for level, res in enumerate(levels) if res in attn_res],
        "dropout": float(_get(config, "model.dropout", (int, float))),
        "ema": bool(config["model"].get("ema", False)),
    }


def unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config equal to ermongroup/ddim's ``Model(config)``."""
    arch = architecture(config)
    n = len(arch["ch_mult"])
    attn = set(arch["attn_levels"])
    return {
        "sample_size": arch["image_size"],
        "in_channels": arch["channels"],
        "out_channels": arch["channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": [("AttnDownBlock2D" if lv in attn else "DownBlock2D") for lv in range(n)],
        "up_block_types": [("AttnUpBlock2D" if lv in attn else "UpBlock2D") for lv in reversed(range(n))],
        "block_out_channels": [arch["ch"] * m for m in arch["ch_mult"]],
        "layers_per_block": arch["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": arch["dropout"],
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": None,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
    }


def _resblock(src: str, dst: str, has_shortcut: bool) -> list[Rule]:
    rules = []
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2")):
        rules += copy_rules(f"{src}.{a}", f"{dst}.{b}")
    rules += copy_rules(f"{src}.conv2", f"{dst}.conv2")
    if has_shortcut:
        rules += copy_rules(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")
    return rules


def _attention(src: str, dst: str) -> list[Rule]:
    rules = copy_rules(f"{src}.norm", f"{dst}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += linear_from_1x1(f"{src}.{a}", f"{dst}.{b}", dims=2)
    return rules


def convert_state_dict(
    source: dict[str, torch.Tensor], config: dict[str, Any], what: str = "the ddim checkpoint"
) -> dict[str, torch.Tensor]:
    """A ``Model`` state dict (no ``module.`` prefix) as the diffusers state dict of ``unet_config``."""
    arch = architecture(config)
    expected = expected_shapes(unet_config(config))
    ch, mult, nrb = arch["ch"], arch["ch_mult"], arch["num_res_blocks"]
    attn = set(arch["attn_levels"])
    in_mult = [1, *mult]
    rules = copy_rules("temb.dense.0", "time_embedding.linear_1") + copy_rules(
        "temb.dense.1", "time_embedding.linear_2"
    )
    rules += copy_rules("conv_in", "conv_in")
    for level in range(len(mult)):
        block_in = ch * in_mult[level]
        for j in range(nrb):
            rules += _resblock(
                f"down.{level}.block.{j}", f"down_blocks.{level}.resnets.{j}", block_in != ch * mult[level]
            )
            block_in = ch * mult[level]
            if level in attn:
                rules += _attention(f"down.{level}.attn.{j}", f"down_blocks.{level}.attentions.{j}")
        if level != len(mult) - 1:
            rules += copy_rules(f"down.{level}.downsample.conv", f"down_blocks.{level}.downsamplers.0.conv")
    rules += _resblock("mid.block_1", "mid_block.resnets.0", False)
    rules += _attention("mid.attn_1", "mid_block.attentions.0")
    rules += _resblock("mid.block_2", "mid_block.resnets.1", False)
    block_in = ch * mult[-1]
    for up, level in enumerate(reversed(range(len(mult)))):  # up.{level}: level 0 = highest resolution
        for j in range(nrb + 1):
            skip = ch * (in_mult[level] if j == nrb else mult[level])
            out = ch * mult[level]
            rules += _resblock(f"up.{level}.block.{j}", f"up_blocks.{up}.resnets.{j}", block_in + skip != out)
            block_in = out
            if level in attn:
                rules += _attention(f"up.{level}.attn.{j}", f"up_blocks.{up}.attentions.{j}")
        if level != 0:
            rules += copy_rules(f"up.{level}.upsample.conv", f"up_blocks.{up}.upsamplers.0.conv")
    rules += copy_rules("norm_out", "conv_norm_out") + copy_rules("conv_out", "conv_out")
    return apply_rules(source, rules, expected, what)


def network_weights(states: Any, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict ``sample()`` ends up with: ``states[0]`` (``module.`` stripped) checked against the
    config, then replaced by the EMA shadow ``states[-1]`` when ``model.ema`` is true."""
    if not isinstance(states, list | tuple) or len(states) < 4:
        raise CheckpointImportError(
            "not an ermongroup/ddim runner checkpoint: expected the list [state_dict, optimizer, epoch, step"
            f"(, ema)] that Diffusion.train() saves, got a {type(states).__name__}"
            + (f" of {len(states)}" if isinstance(states, list | tuple) else "")
        )
    raw = tensor_dict(states[0], "states[0] (the model state dict)")
    prefixed = [k for k in raw if k.startswith("module.")]
    if prefixed and len(prefixed) != len(raw):
        raise CheckpointImportError("states[0] mixes 'module.'-prefixed and plain keys")
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    convert_state_dict(raw, config, "states[0] (the raw model weights)")  # strict, as the runner loads it
    if not config["model"].get("ema", False):
        return raw, "raw"
    if len(states) < 5 or not isinstance(states[-1], dict):
        raise CheckpointImportError(
            "config model.ema is true but the checkpoint has no EMA state dict at states[-1] "
            f"(found a {type(states[-1]).__name__}); the original sample() would fail too"
        )
    ema = tensor_dict(states[-1], "states[-1] (the EMA shadow)")
    # EMAHelper.register unwraps DataParallel, so the shadow has no prefix; a prefixed one is not ours
    if any(k.startswith("module.") for k in ema):
        raise CheckpointImportError("states[-1] (EMA) has 'module.'-prefixed keys; EMAHelper saves none")
    return ema, "ema"


def betas(config: dict[str, Any]) -> np.ndarray:
    """float64 betas as ``runners/diffusion.py get_beta_schedule``."""
    name = _get(config, "diffusion.beta_schedule", str)
    start = float(_get(config, "diffusion.beta_start", (int, float)))
    end = float(_get(config, "diffusion.beta_end", (int, float)))
    steps = _get(config, "diffusion.num_diffusion_timesteps", int)
    if name == "quad":
        return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    if name == "linear":
        return np.linspace(start, end, steps, dtype=np.float64)
    if name == "const":
        return end * np.ones(steps, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(steps, 1, steps, dtype=np.float64)
    if name == "sigmoid":
        x = np.linspace(-6, 6, steps)
        return (1 / (np.exp(-x) + 1)) * (end - start) + start
    raise CheckpointImportError(f"diffusion.beta_schedule={name!r}: one of {SCHEDULES}")


def scheduler_for(config: dict[str, Any]):
    from diffusers import DDPMScheduler

    b = betas(config)
    # the runner turns the float64 betas into a float32 tensor and takes a float32 cumprod; diffusers does
    # the same with trained_betas, so storing the float32 values gives the runner's abar exactly
    b32 = [float(v) for v in b.astype(np.float32)]
    name = config["diffusion"]["beta_schedule"]
    return DDPMScheduler(
        num_train_timesteps=len(b),
        beta_schedule=DIFFUSERS_SCHEDULE.get(name, name),
        beta_start=float(config["diffusion"]["beta_start"]),
        beta_end=float(config["diffusion"]["beta_end"]),
        trained_betas=b32,
        variance_type="fixed_large" if config["model"].get("var_type") == "fixedlarge" else "fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


def import_checkpoint(
    checkpoint: str | Path,
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    input_transform: InputTransform | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Convert an ermongroup/ddim ``ckpt.pth`` with its YAML ``config`` (as a dict) into a model folder."""
    unet_cfg = unet_config(config)
    checkpoint = Path(checkpoint)
    weights, which = network_weights(load_checkpoint(checkpoint), config)
    state = convert_state_dict(weights, config, f"the {which} weights")
    unet = build_unet(unet_cfg, state)
    scheduler = scheduler_for(config)
    celeba = str(config["data"].get("dataset", "")).upper() == "CELEBA"
    transform = input_transform or (
        CELEBA_TRANSFORM if celeba else InputTransform(kind="center_square_resize", interpolation="bilinear")
    )
    sidecar = ModelSidecar(
        timestep_scale=1.0,
        epsilon_channels=None,
        input_transform=transform,
        source={
            "format": FORMAT,
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": file_sha256(checkpoint),
            "weights": which,
            "config": config,
        },
    )
    size = unet_cfg["sample_size"]
    params = sum(p.numel() for p in unet.parameters())
    card = model_card(
        f"ermongroup/ddim {config['data'].get('dataset', '')} {size}x{size}".strip(),
        [
            f"Imported by `ddm-anomaly import {FORMAT}` from `{checkpoint.name}` "
            f"(sha256 `{sidecar.source['checkpoint_sha256'][:16]}…`), {which} weights; "
            f"{params:,} parameters.",
            "",
            "- Network: ermongroup/ddim `models/diffusion.py Model` as a diffusers `UNet2DModel`.",
            f"- Schedule: {len(scheduler.betas)}-step {config['diffusion']['beta_schedule']} (the runner's "
            "float32 betas); the network receives integer timesteps.",
            f"- Input: {transform.kind} ({transform.interpolation}"
            + (f", box left {transform.left} top {transform.top} size {transform.crop}" if celeba else "")
            + "), scaled to [-1, 1].",
        ],
        config,
        CELEBA_LICENCE if celeba else UNKNOWN_LICENCE,
    )
    return write_model_folder(
        out_dir, unet, scheduler, sidecar, card, overwrite=overwrite, verify=verify_folder if verify else None
    )
