"""Model formats: the project's sidecar for what a diffusers folder cannot say, and importers that turn
original-format checkpoints (improved-diffusion / DiffPath, ermongroup/ddim) into diffusers folders."""
