"""``ddm-anomaly import FORMAT CKPT ... --out DIR``: a pretrained checkpoint in its original format becomes a
diffusers model folder (``unet/``, ``scheduler/``, README.md, ddm_anomaly.json) that every other command and
the service load unchanged."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert a pretrained checkpoint (improved-diffusion/DiffPath, ermongroup/ddim) to a model",
        description=(
            "Convert a checkpoint in its original training code's format into a diffusers model folder. "
            "The file is read with torch.load(weights_only=True): no pickled code runs. Nothing is written "
            "to --out unless the whole conversion succeeds and the result loads. docs/MODELS.md has every "
            "step."
        ),
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)

    idf = formats.add_parser(
        "improved-diffusion",
        help="OpenAI improved-diffusion UNetModel state dict (DiffPath's CelebA-32 model)",
        description=(
            "A .pt state dict saved by improved-diffusion's TrainLoop (DiffPath: "
            "celeba_ema_0.9999_499999.pt). The architecture comes from --flags (a JSON object of "
            "improved-diffusion flag names; missing ones take model_and_diffusion_defaults() values) or "
            "--preset."
        ),
    )
    idf.add_argument("checkpoint", type=Path, help="the .pt file")
    which = idf.add_mutually_exclusive_group(required=True)
    which.add_argument("--flags", type=Path, help="JSON object of improved-diffusion flags")
    # no argparse choices: listing the presets loads torch, and --help must not wait for it; an unknown
    # preset is refused with the list when the command runs
    which.add_argument("--preset", help="known model: its flags and input transform (diffpath-celeba32)")
    _common(idf)
    idf.set_defaults(func=run_improved_diffusion)

    ddim = formats.add_parser(
        "ddim",
        help="ermongroup/ddim runner checkpoint (ckpt.pth, the DDIM paper's CelebA-64)",
        description=(
            "ckpt.pth as ermongroup/ddim's runner saves it ([state_dict, optimizer, epoch, step, ema]); the "
            "EMA weights are used when the config says model.ema, as the original sample() does."
        ),
    )
    ddim.add_argument("checkpoint", type=Path, help="the ckpt.pth file")
    ddim.add_argument(
        "--config", type=Path, required=True, help="the repo's YAML config (configs/celeba.yml)"
    )
    _common(ddim)
    ddim.set_defaults(func=run_ddim)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="model folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _report(out: Path) -> int:
    from app.engine.model.sidecar import read_sidecar

    sidecar = read_sidecar(out)
    json.dump({"model": str(out), "sidecar": sidecar.to_json()}, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


def _fail(exc: Exception) -> int:
    print(f"ddm-anomaly import: error: {exc}", file=sys.stderr)
    return 2


def run_improved_diffusion(args: argparse.Namespace) -> int:
    from app.engine.model.importers import CheckpointImportError, improved_diffusion

    try:
        flags = improved_diffusion.read_flags(args.flags) if args.flags else None
        out = improved_diffusion.import_checkpoint(
            args.checkpoint, flags, args.out, preset=args.preset, overwrite=args.overwrite
        )
    except CheckpointImportError as exc:
        return _fail(exc)
    return _report(out)


def run_ddim(args: argparse.Namespace) -> int:
    from app.engine.model.importers import CheckpointImportError, ddim

    try:
        config = ddim.read_config(args.config)
        out = ddim.import_checkpoint(args.checkpoint, config, args.out, overwrite=args.overwrite)
    except CheckpointImportError as exc:
        return _fail(exc)
    return _report(out)
