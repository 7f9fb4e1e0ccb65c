"""OpenAI improved-diffusion checkpoints (``*.pt``: a plain state dict of ``UNetModel``) -> diffusers folder.

This is the format of DiffPath's CelebA-32 model (``celeba_ema_0.9999_499999.pt``, DiffPath's fork of
improved_diffusion) and of OpenAI's own improved-diffusion releases. The file holds no architecture, so the
flags the model was trained with (improved-diffusion's ``model_and_diffusion_defaults()`` names) say it.

What the conversion keeps (verified against the original code's outputs, tests/test_importers.py):

- time embedding ``cat[cos, sin]`` with ``freqs = exp(-ln(10^4) i/half)``: ``flip_sin_to_cos=True,
  freq_shift=0``; GroupNorm(32, eps 1e-5); stride-2 3x3 downsampling convolutions with padding 1;
- ResBlocks with ``use_scale_shift_norm`` -> ``resnet_time_scale_shift="scale_shift"`` (else "default"),
  and the mid-block attention keeps its GroupNorm (``attn_norm_num_groups=32``);
- the fused ``qkv`` 1x1 Conv1d in the legacy per-head order ``[head0: q|k|v, head1: q|k|v, ...]`` is split
  per head into ``to_q/to_k/to_v`` (guided-diffusion's ``use_new_attention_order``: ``[q|k|v]`` thirds);
- the network's own time convention: with ``rescale_timesteps`` it receives ``t * 1000/T`` (float), which
  the sidecar records as ``timestep_scale`` and the engine applies; learned-sigma models answer
  ``[eps | v]``, of which the engine keeps the first 3 channels (``epsilon_channels``);
- the schedule as the float64 betas of the original (cosine with the 0.999 cap, or linear scaled by
  1000/T) in ``trained_betas``, with ``alphas_cumprod_float64`` so the engine's abar is the original's
  float64 cumulative product.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.model.importers.common import (
    CheckpointImportError,
    ExtraRule,
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
    write_model_folder,
)
from app.engine.model.sidecar import InputTransform, ModelSidecar

FORMAT = "improved-diffusion"

# improved_diffusion/script_util.py model_and_diffusion_defaults() (openai/improved-diffusion 1bc7bbb)
DEFAULT_FLAGS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
# Flags of forks that do not change the network's keys or outputs, with their neutral defaults:
# DiffPath's use_zero_module (initialisation only) and clip_denoised; guided-diffusion's channel_mult
# ("" = by image size), num_head_channels (-1 = use num_heads), use_new_attention_order, use_fp16 (training
# precision only) and resblock_updown (only False: UNet2DModel has no ResBlock resampling with these keys).
EXTRA_FLAGS: dict[str, Any] = {
    "use_zero_module": True,
    "clip_denoised": True,  # DiffPath's scripts: a sampling setting, recorded only
    "channel_mult": "",
    "num_head_channels": -1,
    "use_new_attention_order": False,
    "use_fp16": False,
    "resblock_updown": False,
}
# Upstream's channel_mult per image size (create_model); 128 is guided-diffusion's choice (upstream
# improved-diffusion has no 128 default and refuses it).
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}

# DiffPath's CelebA-32 model (clear-nus/diffpath 6f92000, configs/celeba_model_config.yaml over the
# defaults; save_train_statistics.py evaluates it with timestep_respacing="ddim10").
PRESETS: dict[str, dict[str, Any]] = {
    "diffpath-celeba32": {
        "flags": {
            **DEFAULT_FLAGS,
            "image_size": 32,
            "num_channels": 128,
            "num_res_blocks": 3,
            "learn_sigma": True,
            "diffusion_steps": 4000,
            "noise_schedule": "cosine",
            "dropout": 0.3,
            "timestep_respacing": "ddim10",
            "use_zero_module": True,
        },
        # ood_utils.py: CenterCrop(140), Resize(32) (bilinear), ToTensor, Normalize(.5, .5)
        "input_transform": InputTransform(kind="center_crop_resize", interpolation="bilinear", crop=140),
        "title": "DiffPath CelebA-32 (improved-diffusion, 4000-step cosine, learned sigma)",
        "dataset": "CelebA",
    }
}
CELEBA_LICENCE = (
    "Trained on CelebA, whose agreement restricts use to non-commercial research. No separate licence was "
    "found for these weights: check before using this model in a product."
)
UNKNOWN_LICENCE = (
    "The weights' licence is whatever their publisher gave; this folder changes nothing about it."
)


# ---------------------------------------------------------------------------------------------- flags


def read_flags(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointImportError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointImportError(
            f"{path}: the flags must be a JSON object of improved-diffusion flag names"
        )
    return data


def resolve_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """``flags`` over the defaults, type-checked; unknown flag names are refused."""
    known = {**DEFAULT_FLAGS, **EXTRA_FLAGS}
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise CheckpointImportError(f"unknown improved-diffusion flags {unknown}; known: {sorted(known)}")
    out = dict(known)
    for name, value in flags.items():
        default = known[name]
        if name in ("attention_resolutions", "channel_mult") and isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise CheckpointImportError(
                f"flag {name}={value!r}: expected a {type(default).__name__} (like {default!r})"
            )
        out[name] = value
    return out


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CheckpointImportError(f"flag {name}={text!r}: not a comma-separated list of integers") from exc


def architecture(flags: dict[str, Any]) -> dict[str, Any]:
    """The UNetModel that ``create_model`` builds from resolved ``flags``, in plain numbers."""
    refuse = {
        "class_cond": "class-conditional models are not supported (the engine has no class labels)",
        "predict_xstart": "the model predicts x0, not epsilon; only epsilon-prediction models are supported",
        "resblock_updown": "ResBlock up/downsampling (guided-diffusion) has no UNet2DModel equivalent",
    }
    for name, why in refuse.items():
        if flags[name]:
            raise CheckpointImportError(f"flag {name}=True: {why}")
    size = flags["image_size"]
    if flags["channel_mult"]:
        mult = tuple(_int_list(flags["channel_mult"], "channel_mult"))
    elif size in CHANNEL_MULT:
        mult = CHANNEL_MULT[size]
    else:
        raise CheckpointImportError(
            f"image_size={size}: no default channel_mult (sizes {sorted(CHANNEL_MULT)}); give channel_mult"
        )
    if not mult or size % (2 ** (len(mult) - 1)):
        raise CheckpointImportError(
            f"image_size={size} cannot be halved {len(mult) - 1} times (channel_mult)"
        )
    resolutions = _int_list(flags["attention_resolutions"], "attention_resolutions")
    bad = [r for r in resolutions if r <= 0 or size % r]
    if bad:
        raise CheckpointImportError(f"attention_resolutions {bad} do not divide image_size={size}")
    attention_ds = {size // r for r in resolutions}
    nc = flags["num_channels"]
    if nc < 1 or flags["num_res_blocks"] < 1:
        raise CheckpointImportError("num_channels and num_res_blocks must be positive")
    levels = [2**level for level in range(len(mult))]
    attn_levels = [level for level, ds in enumerate(levels) if ds in attention_ds]
    unused = sorted(attention_ds - set(levels))
    if unused:
        raise CheckpointImportError(
            f"attention_resolutions at downsampling rates {unused} that the UNet never reaches"
        )

    def head_dim(channels: int, heads: int) -> int:
        if flags["num_head_channels"] != -1:
            if channels % flags["num_head_channels"]:
                raise CheckpointImportError(
                    f"num_head_channels={flags['num_head_channels']} does not divide {channels} channels"
                )
            return int(flags["num_head_channels"])
        if heads < 1 or channels % heads:
            raise CheckpointImportError(f"{heads} attention heads do not divide {channels} channels")
        return channels // heads

    heads_up = flags["num_heads_upsample"] if flags["num_heads_upsample"] != -1 else flags["num_heads"]
    nrb = flags["num_res_blocks"]
    # every attention layer as (diffusers module path, channels, head size)
    sites = [
        (f"down_blocks.{lv}.attentions.{j}", nc * mult[lv], head_dim(nc * mult[lv], flags["num_heads"]))
        for lv in attn_levels
        for j in range(nrb)
    ]
    sites.append(("mid_block.attentions.0", nc * mult[-1], head_dim(nc * mult[-1], flags["num_heads"])))
    sites += [
        (f"up_blocks.{len(mult) - 1 - lv}.attentions.{j}", nc * mult[lv], head_dim(nc * mult[lv], heads_up))
        for lv in attn_levels
        for j in range(nrb + 1)
    ]
    dims = {d for _, _, d in sites}
    # diffusers' config has one head size for the whole UNet; an improved-diffusion model keeps the head
    # *count* across widths. Then the config's size divides every width (same projection shapes) and the
    # sidecar gives the layers whose head count differs from width // size their own.
    config_dim = dims.pop() if len(dims) == 1 else math.gcd(*(c for _, c, _ in sites))
    heads = {name: c // d for name, c, d in sites if c // d != c // config_dim}
    return {
        "image_size": size,
        "channel_mult": mult,
        "model_channels": nc,
        "num_res_blocks": flags["num_res_blocks"],
        "attn_levels": attn_levels,
        "head_dim": config_dim,
        "attention_heads": heads,
        "out_channels": 6 if flags["learn_sigma"] else 3,
    }


def attention_heads(flags: dict[str, Any]) -> dict[str, int]:
    """Attention layers whose head count the sidecar must set (empty when one head size fits them all)."""
    return dict(architecture(resolve_flags(flags))["attention_heads"])


def unet_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config equal to the improved-diffusion ``UNetModel`` of ``flags``."""
    flags = resolve_flags(flags)
    arch = architecture(flags)
    n = len(arch["channel_mult"])
    attn = set(arch["attn_levels"])
    return {
        "sample_size": arch["image_size"],
        "in_channels": 3,
        "out_channels": arch["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [("AttnDownBlock2D" if lv in attn else "DownBlock2D") for lv in range(n)],
        "up_block_types": [("AttnUpBlock2D" if lv in attn else "UpBlock2D") for lv in reversed(range(n))],
        "block_out_channels": [arch["model_channels"] * m for m in arch["channel_mult"]],
        "layers_per_block": arch["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(flags["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": arch["head_dim"],
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if flags["use_scale_shift_norm"] else "default",
        "add_attention": True,
    }


# ---------------------------------------------------------------------------------------------- weights


def _resblock(src: str, dst: str, has_skip: bool) -> list[Rule]:
    rules = (
        copy_rules(f"{src}.in_layers.0", f"{dst}.norm1")
        + copy_rules(f"{src}.in_layers.2", f"{dst}.conv1")
        + copy_rules(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
        + copy_rules(f"{src}.out_layers.0", f"{dst}.norm2")
        + copy_rules(f"{src}.out_layers.3", f"{dst}.conv2")
    )
    if has_skip:
        rules += copy_rules(f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return rules


def _qkv_splitter(src: str, dst: str, channels: int, head_dim: int, legacy_order: bool):
    """The fused qkv Conv1d (3C, C, 1) -> to_q/to_k/to_v Linear (C, C); per-head order unless the model
    used guided-diffusion's new order ([q | k | v] thirds)."""
    heads = channels // head_dim

    def split(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = source[f"{src}.qkv.weight"].reshape(3 * channels, channels)
        b = source[f"{src}.qkv.bias"]
        if legacy_order:
            w4 = w.reshape(heads, 3, head_dim, channels)
            b3 = b.reshape(heads, 3, head_dim)
            parts = [(w4[:, i].reshape(channels, channels), b3[:, i].reshape(channels)) for i in range(3)]
        else:
            parts = [
                (w[i * channels : (i + 1) * channels], b[i * channels : (i + 1) * channels]) for i in range(3)
            ]
        out = {}
        for name, (wi, bi) in zip(("to_q", "to_k", "to_v"), parts, strict=True):
            out[f"{dst}.{name}.weight"] = wi.clone()
            out[f"{dst}.{name}.bias"] = bi.clone()
        return out

    return split


def _attention(
    src: str, dst: str, channels: int, head_dim: int, legacy_order: bool
) -> tuple[list[Rule], list[ExtraRule]]:
    rules = copy_rules(f"{src}.norm", f"{dst}.group_norm") + linear_from_1x1(
        f"{src}.proj_out", f"{dst}.to_out.0", dims=1
    )
    split = _qkv_splitter(src, dst, channels, head_dim, legacy_order)
    extra: list[ExtraRule] = [
        (f"{src}.qkv.weight", (3 * channels, channels, 1), split),
        (f"{src}.qkv.bias", (3 * channels,), lambda s: {}),  # split together with the weight
    ]
    return rules, extra


def convert_state_dict(source: dict[str, torch.Tensor], flags: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The improved-diffusion state dict as the diffusers state dict of ``unet_config(flags)``."""
    flags = resolve_flags(flags)
    arch = architecture(flags)
    config = unet_config(flags)
    expected = expected_shapes(config)
    mult, nc, nrb = arch["channel_mult"], arch["model_channels"], arch["num_res_blocks"]
    attn_levels, head_dim = set(arch["attn_levels"]), arch["head_dim"]
    legacy = not flags["use_new_attention_order"]
    rules: list[Rule] = []
    extra: list[ExtraRule] = []

    def attention(src: str, dst: str, channels: int) -> None:
        size = channels // arch["attention_heads"][dst] if dst in arch["attention_heads"] else head_dim
        r, e = _attention(src, dst, channels, size, legacy)
        rules.extend(r)
        extra.extend(e)

    rules += copy_rules("time_embed.0", "time_embedding.linear_1") + copy_rules(
        "time_embed.2", "time_embedding.linear_2"
    )
    rules += copy_rules("input_blocks.0.0", "conv_in")
    # input_blocks: per level num_res_blocks x [ResBlock (+ attention)], then a Downsample except at the last
    index, ch = 1, nc
    skip_chans = [nc]
    for level, m in enumerate(mult):
        for j in range(nrb):
            out_ch = nc * m
            rules += _resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", ch != out_ch)
            ch = out_ch
            if level in attn_levels:
                attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", ch)
            skip_chans.append(ch)
            index += 1
        if level != len(mult) - 1:
            rules += copy_rules(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skip_chans.append(ch)
            index += 1
    rules += _resblock("middle_block.0", "mid_block.resnets.0", False)
    attention("middle_block.1", "mid_block.attentions.0", ch)
    rules += _resblock("middle_block.2", "mid_block.resnets.1", False)
    # output_blocks: levels from the lowest resolution up, num_res_blocks + 1 each; diffusers' up_blocks[0]
    # is the lowest resolution too
    index = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            out_ch = nc * mult[level]
            in_ch = ch + skip_chans.pop()
            rules += _resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", in_ch != out_ch)
            ch = out_ch
            sub = 1
            if level in attn_levels:
                attention(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", ch)
                sub = 2
            if level and j == nrb:
                rules += copy_rules(f"output_blocks.{index}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            index += 1
    rules += copy_rules("out.0", "conv_norm_out") + copy_rules("out.2", "conv_out")
    return apply_rules(source, rules, expected, "the improved-diffusion checkpoint", extra)


# ---------------------------------------------------------------------------------------------- schedule


def betas(flags: dict[str, Any]) -> np.ndarray:
    """float64 betas exactly as improved-diffusion's ``get_named_beta_schedule``."""
    flags = resolve_flags(flags)
    steps, schedule = flags["diffusion_steps"], flags["noise_schedule"]
    if steps < 2:
        raise CheckpointImportError(f"diffusion_steps={steps}: need at least 2")
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=np.float64,
        )
    raise CheckpointImportError(
        f"noise_schedule={schedule!r}: improved-diffusion knows 'linear' and 'cosine'"
    )


def scheduler_for(flags: dict[str, Any]):
    from diffusers import DDPMScheduler

    flags = resolve_flags(flags)
    b = betas(flags)
    if flags["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if flags["sigma_small"] else "fixed_large"
    linear = flags["noise_schedule"] == "linear"
    return DDPMScheduler(
        num_train_timesteps=len(b),
        beta_schedule="linear" if linear else "squaredcos_cap_v2",
        beta_start=float(b[0]) if linear else 0.0001,
        beta_end=float(b[-1]) if linear else 0.02,
        trained_betas=[float(v) for v in b],  # float64 values; JSON keeps them exactly
        variance_type=variance,
        clip_sample=True,
        prediction_type="epsilon",
    )


def timestep_scale(flags: dict[str, Any]) -> float:
    flags = resolve_flags(flags)
    return 1000.0 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0


# ---------------------------------------------------------------------------------------------- import


def preset_flags(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise CheckpointImportError(f"unknown preset {name!r}; one of {sorted(PRESETS)}")
    return dict(PRESETS[name]["flags"])


def import_checkpoint(
    checkpoint: str | Path,
    flags: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    preset: str | None = None,
    input_transform: InputTransform | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Convert ``checkpoint`` (improved-diffusion ``UNetModel`` state dict) into a model folder at
    ``out_dir``; ``flags`` (improved-diffusion names, defaults filled in) or ``preset`` (its flags, input
    transform and card) describe the network. Returns ``out_dir``; on any error nothing is written there."""
    if preset is not None:
        if flags is not None:
            raise CheckpointImportError("give flags or a preset, not both")
        flags = preset_flags(preset)
    if flags is None:
        raise CheckpointImportError("flags (improved-diffusion flag names) or a preset are required")
    flags = resolve_flags(flags)
    config = unet_config(flags)
    checkpoint = Path(checkpoint)
    raw = load_checkpoint(checkpoint)
    source = tensor_dict(raw, f"{checkpoint.name}")
    state = convert_state_dict(source, flags)
    unet = build_unet(config, state)
    scheduler = scheduler_for(flags)
    info = PRESETS.get(preset or "", {})
    transform = input_transform or info.get("input_transform") or InputTransform()
    scale = timestep_scale(flags)
    sidecar = ModelSidecar(
        timestep_scale=scale,
        epsilon_channels=3 if flags["learn_sigma"] else None,
        input_transform=transform,
        alphas_cumprod_float64=True,
        attention_heads=attention_heads(flags),
        source={
            "format": FORMAT,
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": file_sha256(checkpoint),
            "preset": preset,
            "flags": flags,
        },
    )
    params = sum(p.numel() for p in unet.parameters())
    card = model_card(
        info.get("title", f"improved-diffusion model ({checkpoint.name})"),
        [
            f"Imported by `ddm-anomaly import {FORMAT}` from `{checkpoint.name}` "
            f"(sha256 `{sidecar.source['checkpoint_sha256'][:16]}…`); {params:,} parameters.",
            "",
            f"- Network: improved-diffusion `UNetModel`, {flags['image_size']} px, "
            "as a diffusers `UNet2DModel`.",
            f"- Schedule: {flags['diffusion_steps']}-step {flags['noise_schedule']} (float64 betas).",
            f"- Calling convention (`ddm_anomaly.json`): the network receives `t * {scale:g}`"
            + ("; it answers 6 channels, the first 3 are epsilon." if flags["learn_sigma"] else "."),
            f"- Input: {transform.kind} ({transform.interpolation}"
            + (f", crop {transform.crop}" if transform.crop else "")
            + "), scaled to [-1, 1].",
        ],
        flags,
        CELEBA_LICENCE if info.get("dataset") == "CelebA" else UNKNOWN_LICENCE,
    )
    return write_model_folder(
        out_dir, unet, scheduler, sidecar, card, overwrite=overwrite, verify=verify_folder if verify else None
    )


def verify_folder(folder: Path) -> None:
    """The written folder loads through the project's own loader (what every command and the service do)."""
    from app.engine.model.loading import ModelLoadError, load_model

    try:
        load_model(folder, device="cpu", dtype="float32", runtime="torch")
    except ModelLoadError as exc:
        raise CheckpointImportError(f"the written folder does not load: {exc}") from exc
