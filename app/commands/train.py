"""``ddm-anomaly train``: train or fine-tune the base diffusion model on folders of images."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from app.errors import InvalidInput

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Train an unconditional diffusers UNet2DModel (epsilon prediction, cosine schedule) on one or more
folders of PNG/JPEG images (centre square crop, bicubic resize, random horizontal flips).

Output (a diffusers model folder): OUT/unet (EMA weights, safetensors), OUT/scheduler, OUT/training.json,
OUT/log.jsonl, and OUT/checkpoints/step-XXXXXX/ (each a loadable model + resume state + samples.png).
If OUT already holds a checkpoint, training resumes from the newest one; --steps/--minutes are totals
over every invocation, so re-running the same command after an interruption finishes the same run.
SIGINT/SIGTERM stop after the current step and save a checkpoint."""

EPILOG = """\
example (continue the reference model on the two CelebA sets, 1 CPU thread, 150 minutes):
  ddm-anomaly train --images ../shared/data/celeba --images ../shared/data/celeba_halfres \\
      --init-from ../shared/models/celeba32-ref --out runs/celeba32-ft --minutes 150 --threads 1"""


def _int_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune the base diffusion model on image folders",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data and output")
    data.add_argument("--images", type=Path, action="append", required=True, metavar="DIR",
                      help="folder of training images (recursive); repeat for several")  # fmt: skip
    data.add_argument("--out", type=Path, required=True, metavar="DIR", help="output / resume folder")
    data.add_argument("--init-from", type=Path, metavar="DIR",
                      help="start from this diffusers model folder (unet/ + scheduler/), e.g. "
                      "../shared/models/celeba32-ref; fp16 weights are loaded into fp32")  # fmt: skip

    model = p.add_argument_group("fresh model (without --init-from)")
    model.add_argument("--resolution", type=int, help="image size in pixels (default 32, or the model's)")
    model.add_argument("--channels", type=_int_list, default=(32, 64, 128, 128), metavar="C1,C2,...",
                       help="block output channels per level (default 32,64,128,128)")  # fmt: skip
    model.add_argument("--layers-per-block", type=int, default=1, help="ResNet layers per block (default 1)")
    model.add_argument("--attention-res", type=_int_list, default=(8,), metavar="R1,...",
                       help="feature-map sizes with self-attention; 'none' for none (default 8)")  # fmt: skip
    model.add_argument("--dropout", type=float, default=0.1, help="dropout (default 0.1)")

    budget = p.add_argument_group("budget (totals over every invocation of the run; whichever comes first)")
    budget.add_argument("--steps", type=int, metavar="N", help="stop after N optimiser steps")
    budget.add_argument("--minutes", type=float, metavar="M", help="stop after M minutes of training")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    opt.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    opt.add_argument("--warmup-steps", type=int, default=500, help="linear lr warm-up (default 500)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    opt.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights")
    opt.add_argument("--seed", type=int, default=0, help="seed of data order, noise and samples")

    io = p.add_argument_group("checkpoints, samples, runtime")
    io.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                    help="checkpoint every N steps (all kept; 0 = only at the end)")  # fmt: skip
    io.add_argument("--keep-resume-states", type=int, default=2, metavar="K",
                    help="keep optimizer/raw-weight state in the newest K checkpoints only (2)")  # fmt: skip
    io.add_argument("--sample-every", type=int, default=500, metavar="N",
                    help="draw a 16-image DDIM-50 sample grid every N steps (0 = never)")  # fmt: skip
    io.add_argument("--save-fp16", action=argparse.BooleanOptionalAction, default=True,
                    help="save unet weights as fp16 (default on)")  # fmt: skip
    io.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    io.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    io.add_argument("--log-every", type=int, default=50, help="append to OUT/log.jsonl every N steps")
    io.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="tqdm bar (default: when stderr is a terminal; log lines otherwise)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.bootstrap import set_torch_threads
    from app.training import TrainConfig, train  # heavy imports only when the command runs

    set_torch_threads(args.threads)

    config = TrainConfig(
        images=list(args.images),
        out=args.out,
        init_from=args.init_from,
        resolution=args.resolution,
        channels=args.channels,
        layers_per_block=args.layers_per_block,
        attention_resolutions=args.attention_res,
        dropout=args.dropout,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        keep_resume_states=args.keep_resume_states,
        save_fp16=args.save_fp16,
        log_every=args.log_every,
        progress=args.progress,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("signal %d: stopping after this step (again to abort without saving)", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = train(config, stop=stop)
    except InvalidInput as exc:
        logger.error("%s", exc)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(
        f"trained {result.start_step} -> {result.step} steps ({result.stop_reason}), "
        f"loss_ema {result.loss_ema:.4f}, {result.session_steps_per_s:.3f} steps/s; model in {result.out}"
        if result.loss_ema is not None
        else f"no steps to run ({result.stop_reason}); model in {result.out}"
    )
    return 130 if result.stop_reason == "interrupted" else 0
