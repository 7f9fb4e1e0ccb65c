"""improved-diffusion's flags (``model_and_diffusion_defaults()`` names): defaults, the neutral flags of its
forks, the presets of published models, and reading, checking and completing a set of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine.model.importers.common import CheckpointImportError
from app.engine.model.sidecar import InputTransform

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


def preset_flags(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise CheckpointImportError(f"unknown preset {name!r}; one of {sorted(PRESETS)}")
    return dict(PRESETS[name]["flags"])


def timestep_scale(flags: dict[str, Any]) -> float:
    flags = resolve_flags(flags)
    return 1000.0 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0
