"""Materialise a model folder (``unet/`` + ``scheduler/``) with random weights from a config folder.

    python benchmarks/random_model.py benchmarks/configs/ddpm-celebahq-256 /tmp/celebahq256-random

Costs (FLOPs, memory, time) equal the real checkpoint's; scores mean nothing. Used by gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DModel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "config", type=Path, help="folder with unet/config.json and scheduler/scheduler_config.json"
    )
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = json.loads((args.config / "unet" / "config.json").read_text())
    unet = UNet2DModel.from_config(config)
    unet.save_pretrained(args.out / "unet", safe_serialization=True)
    (args.out / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config / "scheduler" / "scheduler_config.json", args.out / "scheduler")
    print(f"{args.out}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters (random)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
