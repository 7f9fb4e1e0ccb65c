"""``ddm_anomaly.json``: what a diffusers folder cannot say about a model, kept beside ``unet/``.

diffusers' ``UNet2DModel`` config describes the network and ``scheduler_config.json`` the noise schedule,
but not how the network was *called* by the code that trained it (improved-diffusion feeds ``t * 1000/T``,
learned-sigma models answer 6 channels of which the first 3 are epsilon) nor how its training images were
made (DiffPath's CelebA: centre crop 140, bilinear resize to 32). Importers write this file; the loader and
preprocessing read it. A folder without the file is a plain diffusers model: integer timesteps, every
output channel is epsilon, largest centred square resized to the model's size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_FILE = "ddm_anomaly.json"
SIDECAR_VERSION = 1
INPUT_TRANSFORMS = ("center_square_resize", "center_crop_resize", "box_crop_resize")
INTERPOLATIONS = ("bicubic", "bilinear")


class SidecarError(ValueError):
    """The sidecar exists but does not describe a model this version can run."""


@dataclass(frozen=True)
class InputTransform:
    """How an uploaded image becomes the model's input, before scaling to [-1, 1].

    ``center_square_resize``: the largest centred square, resized to the model size (the default).
    ``center_crop_resize``: a centred ``crop`` x ``crop`` box (torchvision CenterCrop), then resize.
    ``box_crop_resize``: the box ``(left, top, crop, crop)``, then resize (DDIM's CelebA crop).
    """

    kind: str = "center_square_resize"
    interpolation: str = "bicubic"
    crop: int | None = None
    left: int | None = None
    top: int | None = None

    def validate(self) -> None:
        if self.kind not in INPUT_TRANSFORMS:
            raise SidecarError(f"input_transform.kind {self.kind!r} not one of {INPUT_TRANSFORMS}")
        if self.interpolation not in INTERPOLATIONS:
            raise SidecarError(
                f"input_transform.interpolation {self.interpolation!r} not one of {INTERPOLATIONS}"
            )
        if self.kind != "center_square_resize" and (self.crop is None or self.crop < 1):
            raise SidecarError(f"input_transform {self.kind} needs a positive crop size")
        if self.kind == "box_crop_resize" and (self.left is None or self.top is None):
            raise SidecarError("input_transform box_crop_resize needs left and top")


@dataclass(frozen=True)
class ModelSidecar:
    """Calling convention and input transform of a model folder (defaults = a plain diffusers model)."""

    timestep_scale: float = 1.0  # the network receives t_index * timestep_scale (improved-diffusion: 1000/T)
    epsilon_channels: int | None = None  # first N output channels are epsilon; None = all of them
    input_transform: InputTransform = field(default_factory=InputTransform)
    source: dict[str, Any] = field(default_factory=dict)  # provenance: format, checkpoint sha256, flags
    # True: abar is the float64 cumulative product of the scheduler config's ``trained_betas`` (what
    # improved-diffusion computes in numpy); False: the diffusers scheduler's own (float32) abar.
    alphas_cumprod_float64: bool = False
    # {attention module path in the UNet2DModel: heads} where a layer's head count is not
    # channels // attention_head_dim: diffusers' config has one head size for the whole UNet, an
    # improved-diffusion model a fixed head *count* across widths. The loader sets these after loading.
    attention_heads: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": SIDECAR_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSidecar:
        if not isinstance(data, dict):
            raise SidecarError("sidecar must be a JSON object")
        version = data.get("version")
        if version != SIDECAR_VERSION:
            raise SidecarError(f"sidecar version {version!r} not supported (expected {SIDECAR_VERSION})")
        known = {
            "version",
            "timestep_scale",
            "epsilon_channels",
            "input_transform",
            "source",
            "alphas_cumprod_float64",
            "attention_heads",
        }
        unknown = set(data) - known
        if unknown:
            raise SidecarError(f"unknown sidecar fields: {sorted(unknown)}")
        try:
            transform = InputTransform(**data.get("input_transform", {}))
            sidecar = cls(
                timestep_scale=float(data.get("timestep_scale", 1.0)),
                epsilon_channels=data.get("epsilon_channels"),
                input_transform=transform,
                source=dict(data.get("source", {})),
                alphas_cumprod_float64=bool(data.get("alphas_cumprod_float64", False)),
                attention_heads=dict(data.get("attention_heads", {})),
            )
        except TypeError as exc:
            raise SidecarError(f"malformed sidecar: {exc}") from exc
        transform.validate()
        if not sidecar.timestep_scale > 0:
            raise SidecarError("timestep_scale must be positive")
        if sidecar.epsilon_channels is not None and int(sidecar.epsilon_channels) < 1:
            raise SidecarError("epsilon_channels must be positive")
        for name, heads in sidecar.attention_heads.items():
            if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
                raise SidecarError(f"attention_heads[{name!r}] must be a positive integer")
        return sidecar

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / SIDECAR_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path


def read_sidecar(model_dir: str | Path) -> ModelSidecar:
    """The folder's sidecar, or the plain-diffusers defaults when it has none."""
    path = Path(model_dir) / SIDECAR_FILE
    if not path.is_file():
        return ModelSidecar()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SidecarError(f"{path}: not readable JSON: {exc}") from exc
    return ModelSidecar.from_json(data)
