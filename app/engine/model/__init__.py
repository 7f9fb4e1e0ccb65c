"""The one model reader: every command and the service load a model folder through ``loading.load_model``.

``loading``: a diffusers folder (``unet/`` + ``scheduler/``, or flat) plus the project's sidecar
(``sidecar``: calling convention and input transform) -> a UNet on its device with its schedule
(``schedule``: abar read once from the scheduler config, in float32 and as the recipe's exact float64).
``runtimes``: what computes eps_theta (eager torch, or ONNX Runtime on CPU). ``importers``: original-format
checkpoints (improved-diffusion / DiffPath, ermongroup/ddim) -> such a folder (``ddm-anomaly import``).
"""
