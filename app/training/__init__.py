"""Training and sampling of the base diffusion model (science side: no web imports)."""

from app.training.loop import TrainConfig, TrainResult, train
from app.training.model import UNetSpec, build_unet, load_model_dir
from app.training.sampling import ddim_sample, save_grid

__all__ = [
    "TrainConfig",
    "TrainResult",
    "UNetSpec",
    "build_unet",
    "ddim_sample",
    "load_model_dir",
    "save_grid",
    "train",
]
