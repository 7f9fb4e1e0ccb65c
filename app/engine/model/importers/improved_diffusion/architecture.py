"""The network improved-diffusion's ``create_model`` builds from a set of flags, and the diffusers
``UNet2DModel`` config equal to it."""

from __future__ import annotations

import math
from typing import Any

from app.engine.model.importers.common import CheckpointImportError
from app.engine.model.importers.improved_diffusion.flags import resolve_flags

# Upstream's channel_mult per image size (create_model); 128 is guided-diffusion's choice (upstream
# improved-diffusion has no 128 default and refuses it).
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}

REFUSED = {
    "class_cond": "class-conditional models are not supported (the engine has no class labels)",
    "predict_xstart": "the model predicts x0, not epsilon; only epsilon-prediction models are supported",
    "resblock_updown": "ResBlock up/downsampling (guided-diffusion) has no UNet2DModel equivalent",
}


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CheckpointImportError(f"flag {name}={text!r}: not a comma-separated list of integers") from exc


def architecture(flags: dict[str, Any]) -> dict[str, Any]:
    """The UNetModel that ``create_model`` builds from resolved ``flags``, in plain numbers."""
    for name, why in REFUSED.items():
        if flags[name]:
            raise CheckpointImportError(f"flag {name}=True: {why}")
    mult = channel_mult(flags)
    attention_ds = attention_downsampling(flags)
    nc = flags["num_channels"]
    if nc < 1 or flags["num_res_blocks"] < 1:
        raise CheckpointImportError("num_channels and num_res_blocks must be positive")
    attn_levels = attention_levels(attention_ds, mult)
    sites = attention_sites(flags, mult, attn_levels)
    dims = {d for _, _, d in sites}
    # diffusers' config has one head size for the whole UNet; an improved-diffusion model keeps the head
    # *count* across widths. Then the config's size divides every width (same projection shapes) and the
    # sidecar gives the layers whose head count differs from width // size their own.
    config_dim = dims.pop() if len(dims) == 1 else math.gcd(*(c for _, c, _ in sites))
    heads = {name: c // d for name, c, d in sites if c // d != c // config_dim}
    return {
        "image_size": flags["image_size"],
        "channel_mult": mult,
        "model_channels": nc,
        "num_res_blocks": flags["num_res_blocks"],
        "attn_levels": attn_levels,
        "head_dim": config_dim,
        "attention_heads": heads,
        "out_channels": 6 if flags["learn_sigma"] else 3,
    }


def channel_mult(flags: dict[str, Any]) -> tuple[int, ...]:
    """Width multiplier per resolution level: ``channel_mult``, else upstream's default for the size."""
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
    return mult


def attention_downsampling(flags: dict[str, Any]) -> set[int]:
    """The downsampling rates with self-attention (``attention_resolutions`` are feature-map sizes)."""
    size = flags["image_size"]
    resolutions = _int_list(flags["attention_resolutions"], "attention_resolutions")
    bad = [r for r in resolutions if r <= 0 or size % r]
    if bad:
        raise CheckpointImportError(f"attention_resolutions {bad} do not divide image_size={size}")
    return {size // r for r in resolutions}


def attention_levels(attention_ds: set[int], mult: tuple[int, ...]) -> list[int]:
    """The resolution levels (0 = full size) whose downsampling rate has self-attention."""
    levels = [2**level for level in range(len(mult))]
    unused = sorted(attention_ds - set(levels))
    if unused:
        raise CheckpointImportError(
            f"attention_resolutions at downsampling rates {unused} that the UNet never reaches"
        )
    return [level for level, ds in enumerate(levels) if ds in attention_ds]


def _head_dim(flags: dict[str, Any], channels: int, heads: int) -> int:
    if flags["num_head_channels"] != -1:
        if channels % flags["num_head_channels"]:
            raise CheckpointImportError(
                f"num_head_channels={flags['num_head_channels']} does not divide {channels} channels"
            )
        return int(flags["num_head_channels"])
    if heads < 1 or channels % heads:
        raise CheckpointImportError(f"{heads} attention heads do not divide {channels} channels")
    return channels // heads


def attention_sites(
    flags: dict[str, Any], mult: tuple[int, ...], attn_levels: list[int]
) -> list[tuple[str, int, int]]:
    """Every attention layer as (diffusers module path, channels, head size)."""
    nc, nrb, heads = flags["num_channels"], flags["num_res_blocks"], flags["num_heads"]
    heads_up = flags["num_heads_upsample"] if flags["num_heads_upsample"] != -1 else heads
    sites = [
        (f"down_blocks.{lv}.attentions.{j}", nc * mult[lv], _head_dim(flags, nc * mult[lv], heads))
        for lv in attn_levels
        for j in range(nrb)
    ]
    sites.append(("mid_block.attentions.0", nc * mult[-1], _head_dim(flags, nc * mult[-1], heads)))
    sites += [
        (
            f"up_blocks.{len(mult) - 1 - lv}.attentions.{j}",
            nc * mult[lv],
            _head_dim(flags, nc * mult[lv], heads_up),
        )
        for lv in attn_levels
        for j in range(nrb + 1)
    ]
    return sites


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
