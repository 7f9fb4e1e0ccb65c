"""No host/device synchronisation inside the trajectory loop (CUDA only; skipped elsewhere).

    python benchmarks/sync_check.py [--model DIR] [--batch 8]

Runs the engine's device part (walk + Stein errors + SSIM + sums, ``batch_statistics``) once to warm up
(cached SSIM operators are copied to the device on first use), then again under
``torch.cuda.set_sync_debug_mode("error")``: any call that makes the host wait for the GPU (``.item()``,
a device->host copy, a data-dependent shape) raises. The single copy to host after the loop is outside.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.engine.engine import Engine
from app.engine.walk_driver import batch_statistics

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "model_store" / "celeba32-ref")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync check skipped: no CUDA device")
        return 0
    engine = Engine(args.model, device="cuda")
    engine.load(warmup_batch=0)
    model, size = engine.model, engine.info.sample_size
    x0 = torch.rand(args.batch, engine.info.in_channels, size, size, device=model.device) * 2 - 1
    failed = []
    for method in ("diffpath-v2", "diffpath-6d", "reconstruction"):
        digests = [bytes([i]) for i in range(args.batch)]
        with torch.inference_mode():
            batch_statistics(model, x0, engine.options, digests, (method,))
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                batch_statistics(model, x0, engine.options, digests, (method,))
                print(f"{method}: no host/device sync inside the trajectory")
            except RuntimeError as exc:
                failed.append(method)
                print(f"{method}: SYNC inside the trajectory: {exc}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
