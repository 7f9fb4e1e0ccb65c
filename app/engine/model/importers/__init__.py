"""Importers: pretrained checkpoints in their original formats -> a diffusers model folder the engine loads.

One module per format (``improved_diffusion``, ``ddim``); ``common`` holds the checks and the atomic write.
Each writes ``unet/`` (``UNet2DModel``), ``scheduler/``, a model card and ``ddm_anomaly.json`` (sidecar.py).
"""

from app.engine.model.importers.common import CheckpointImportError

__all__ = ["CheckpointImportError"]
