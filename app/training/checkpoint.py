"""Checkpoint folders: ``<out>/checkpoints/step-XXXXXX/`` = a loadable diffusers model (``unet/`` with the
EMA weights, ``scheduler/``) + ``state.pt`` (raw weights, optimizer, EMA, data order, RNG, counters) for
resuming, + ``samples.png`` when a grid was drawn at that step.

Each checkpoint is written to a temporary folder and renamed into place, so a cut session leaves either a
complete checkpoint or none. Old checkpoints keep their model (for measuring detection quality against
training steps) but lose ``state.pt`` beyond the newest ``keep_resume_states``."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SAMPLES_FILE = "samples.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "unet").is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_resumable(out: Path) -> Path | None:
    """The newest checkpoint that still has its resume state, or None."""
    for _, folder in reversed(list_checkpoints(out)):
        if (folder / STATE_FILE).is_file():
            return folder
    return None


def write_model_folder(unet: UNet2DModel, scheduler: SchedulerMixin, dest: Path, fp16: bool) -> None:
    """``dest/unet`` (safetensors, fp16 if asked; ``unet`` itself is not modified) + ``dest/scheduler``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    to_save = unet
    if fp16:
        to_save = UNet2DModel.from_config(unet.config)
        to_save.load_state_dict(unet.state_dict())
        to_save = to_save.half()  # nn.Module.half: ModelMixin.to would warn about fp32-kept modules
    to_save.save_pretrained(dest / "unet", safe_serialization=True)
    scheduler.save_pretrained(dest / "scheduler")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place (replacing an older one of the same name)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def save_checkpoint(
    out: Path,
    step: int,
    ema_unet: UNet2DModel,
    scheduler: SchedulerMixin,
    state: dict[str, Any],
    fp16: bool,
    samples_writer: Any = None,
) -> Path:
    """Write ``step-XXXXXX/`` atomically; ``samples_writer(path)``, if given, draws the sample grid."""
    root = checkpoints_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model_folder(ema_unet, scheduler, tmp, fp16)
    torch.save(state, tmp / STATE_FILE)
    if samples_writer is not None:
        samples_writer(tmp / SAMPLES_FILE)
    replace_dir(tmp, final)
    return final


def load_state(folder: Path, device: torch.device) -> dict[str, Any]:
    state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{folder / STATE_FILE} is not a training state")
    return state


def prune_resume_states(out: Path, keep: int) -> None:
    """Delete ``state.pt`` from all but the newest ``keep`` checkpoints that have one (keep >= 1)."""
    with_state = [f for _, f in list_checkpoints(out) if (f / STATE_FILE).is_file()]
    for folder in with_state[: max(0, len(with_state) - max(1, keep))]:
        (folder / STATE_FILE).unlink()
        logger.debug("pruned resume state of %s", folder.name)
