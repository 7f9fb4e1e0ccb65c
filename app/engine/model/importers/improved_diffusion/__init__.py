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

One module per concern: ``flags`` (defaults, presets, checking), ``architecture`` (the network the flags
describe and its diffusers config), ``weights`` (state-dict conversion), ``schedule`` (float64 betas),
``importer`` (the folder: sidecar, card, atomic write).
"""

from app.engine.model.importers.common import tensor_dict, verify_folder
from app.engine.model.importers.improved_diffusion.architecture import (
    CHANNEL_MULT,
    architecture,
    attention_heads,
    unet_config,
)
from app.engine.model.importers.improved_diffusion.flags import (
    CELEBA_LICENCE,
    DEFAULT_FLAGS,
    EXTRA_FLAGS,
    FORMAT,
    PRESETS,
    UNKNOWN_LICENCE,
    preset_flags,
    read_flags,
    resolve_flags,
    timestep_scale,
)
from app.engine.model.importers.improved_diffusion.importer import import_checkpoint
from app.engine.model.importers.improved_diffusion.schedule import betas, scheduler_for
from app.engine.model.importers.improved_diffusion.weights import convert_state_dict

__all__ = [
    "CELEBA_LICENCE",
    "CHANNEL_MULT",
    "DEFAULT_FLAGS",
    "EXTRA_FLAGS",
    "FORMAT",
    "PRESETS",
    "UNKNOWN_LICENCE",
    "architecture",
    "attention_heads",
    "betas",
    "convert_state_dict",
    "import_checkpoint",
    "preset_flags",
    "read_flags",
    "resolve_flags",
    "scheduler_for",
    "tensor_dict",
    "timestep_scale",
    "unet_config",
    "verify_folder",
]
