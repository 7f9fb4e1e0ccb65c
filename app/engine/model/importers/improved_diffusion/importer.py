"""An improved-diffusion checkpoint -> a model folder: weights, schedule, sidecar (calling convention and
input transform) and model card, written atomically and loaded back before it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.engine.model.importers.common import (
    CheckpointImportError,
    build_unet,
    file_sha256,
    load_checkpoint,
    model_card,
    tensor_dict,
    verify_folder,
    write_model_folder,
)
from app.engine.model.importers.improved_diffusion.architecture import attention_heads, unet_config
from app.engine.model.importers.improved_diffusion.flags import (
    CELEBA_LICENCE,
    FORMAT,
    PRESETS,
    UNKNOWN_LICENCE,
    preset_flags,
    resolve_flags,
    timestep_scale,
)
from app.engine.model.importers.improved_diffusion.schedule import scheduler_for
from app.engine.model.importers.improved_diffusion.weights import convert_state_dict
from app.engine.model.sidecar import InputTransform, ModelSidecar


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
    sidecar = ModelSidecar(
        timestep_scale=timestep_scale(flags),
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
    card = _card(checkpoint.name, flags, info, sidecar, sum(p.numel() for p in unet.parameters()))
    return write_model_folder(
        out_dir, unet, scheduler, sidecar, card, overwrite=overwrite, verify=verify_folder if verify else None
    )


def _card(name: str, flags: dict[str, Any], info: dict[str, Any], sidecar: ModelSidecar, params: int) -> str:
    """The folder's README.md: where it came from and how the engine calls it."""
    transform = sidecar.input_transform
    return model_card(
        info.get("title", f"improved-diffusion model ({name})"),
        [
            f"Imported by `ddm-anomaly import {FORMAT}` from `{name}` "
            f"(sha256 `{sidecar.source['checkpoint_sha256'][:16]}…`); {params:,} parameters.",
            "",
            f"- Network: improved-diffusion `UNetModel`, {flags['image_size']} px, "
            "as a diffusers `UNet2DModel`.",
            f"- Schedule: {flags['diffusion_steps']}-step {flags['noise_schedule']} (float64 betas).",
            "- Calling convention (`ddm_anomaly.json`): the network receives "
            f"`t * {sidecar.timestep_scale:g}`"
            + ("; it answers 6 channels, the first 3 are epsilon." if flags["learn_sigma"] else "."),
            f"- Input: {transform.kind} ({transform.interpolation}"
            + (f", crop {transform.crop}" if transform.crop else "")
            + "), scaled to [-1, 1].",
        ],
        flags,
        CELEBA_LICENCE if info.get("dataset") == "CelebA" else UNKNOWN_LICENCE,
    )
