"""ddm-anomaly: zero-shot image anomaly scoring along a diffusion model's denoising trajectory."""

__version__ = "0.1.0"
