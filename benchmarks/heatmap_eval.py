"""Do heat maps point at the anomaly? Pixel AUROC of candidate maps on synthetic local anomalies.

Normal CelebA faces get a pasted DTD or CIFAR-10 patch (benchmarks/local_anomalies.py; the patch's mask is
the ground truth). Each image walks the shipped model's trajectory once (default options), keeping the
per-step maps; candidate heat maps are built from them and scored by pixel-level AUROC over all pixels of
all synthetic images (anomalib's pixel AUROC), at the model's resolution. Per-pixel statistics come from
reference faces disjoint from the faces that carry patches, as a calibration profile's would.

    python benchmarks/heatmap_eval.py --data ../shared/data --reference 300 --synthetic 300 \
        --json benchmarks/results/heatmaps/2026-12-07-heatmaps.json --figure docs/img/heatmap_examples.png
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from app.engine.calibration.heatmap import HeatmapCalibration, fit_heatmap_calibration, smooth, standardise
from app.engine.calibration.profile import Profile
from app.engine.engine import Engine
from app.engine.explain import heatmap_png
from app.engine.methods.diffpath_v2 import amplified_error
from app.engine.methods.path_sums import HEAT_NOISE_RANGE
from app.engine.ssim import ssim_map
from app.engine.trajectory import trajectory_grid, walk
from app.engine.types import MethodOptions
from app.offline.datasets import list_images
from benchmarks.local_anomalies import LocalAnomalies, mask_at

MAP_KINDS = ("amp", "err", "dis", "rec")  # |a_k|, |e_k|, 1 - SSIM(x0, xhat0_k), |x0 - xhat0_k|
PRODUCT = "mid-noise steps, z, sigma=2.0"  # what the service draws


def noise_levels(engine: Engine) -> np.ndarray:
    """abar at each step of the default trajectory."""
    model, options = engine.model, engine.options
    timesteps = trajectory_grid(options.trajectory, len(model.alphas_cumprod), options.steps)
    return model.alphas_cumprod[timesteps].double().cpu().numpy()


def step_maps(engine: Engine, images: Sequence[Image.Image], batch_size: int = 32) -> dict[str, np.ndarray]:
    """(N, K, H, W) channel-mean maps of every kind, plus today's served heat map (N, H, W)."""
    model, options = engine.model, engine.options
    timesteps = trajectory_grid(options.trajectory, len(model.alphas_cumprod), options.steps)
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in (*MAP_KINDS, "served", "features")}
    for start in range(0, len(images), batch_size):
        prepared = [engine.prepare(im) for im in images[start : start + batch_size]]
        x0 = torch.stack([p.tensor for p in prepared]).to(model.device)
        per_kind: dict[str, list[torch.Tensor]] = {kind: [] for kind in MAP_KINDS}
        with torch.inference_mode():
            for step in walk(model, x0, timesteps, options.trajectory):
                per_kind["amp"].append(amplified_error(step, x0, options).abs().mean(1))
                per_kind["err"].append((step.eps_theta - step.eps_star).abs().mean(1))
                per_kind["dis"].append((1 - ssim_map(x0, step.xhat0, 2.0)).mean(1).clamp_min(0))
                per_kind["rec"].append((x0 - step.xhat0).abs().mean(1))
        for kind, maps in per_kind.items():
            out[kind].append(torch.stack(maps, 1).float().cpu().numpy())
        stats = engine.image_stats(prepared)
        out["served"].append(np.stack([s.heatmap for s in stats]))
        out["features"].append(np.stack([s.features for s in stats]))
    return {kind: np.concatenate(chunks) for kind, chunks in out.items()}


# --- candidate maps: per-step maps (N, K, H, W) + reference statistics -> (N, H, W) -----------------------

# The engine's heat map averages the steps whose abar (signal fraction) is in this range
MID_NOISE = HEAT_NOISE_RANGE


def minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def z_against(ref: np.ndarray, test: np.ndarray, sigma: float, order: str = "smooth-log") -> np.ndarray:
    """Per-pixel z-score of the test maps against the reference maps' mean and std (N, H, W each)."""

    def prepare(maps: np.ndarray) -> np.ndarray:
        if order == "log-smooth":
            return smooth(np.log(np.maximum(maps, 1e-12)), sigma)
        if order == "smooth":
            return smooth(maps, sigma)
        return np.log(np.maximum(smooth(maps, sigma), 1e-12))

    r = prepare(ref)
    return standardise(prepare(test), r.mean(0), r.std(0))


Candidate = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (reference steps, test steps) -> test maps


def candidates(abar: np.ndarray) -> dict[str, Candidate]:
    """Named ways to turn per-step maps into one heat map (reference maps give the per-pixel statistics)."""
    mid = (abar >= MID_NOISE[0]) & (abar <= MID_NOISE[1])

    def steps_z(window: np.ndarray, sigma: float, order: str = "smooth-log") -> Candidate:
        return lambda ref, test: z_against(ref[:, window].mean(1), test[:, window].mean(1), sigma, order)

    def per_step_z(sigma: float) -> Candidate:
        def build(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
            return np.mean([z_against(ref[:, k], test[:, k], sigma) for k in np.flatnonzero(mid)], axis=0)

        return build

    every = np.ones_like(mid)
    out: dict[str, Candidate] = {
        "today: all steps, per-image min-max": lambda ref, test: minmax(test.mean(1)),
        "all steps, raw": lambda ref, test: test.mean(1),
    }
    for sigma in (0.0, 1.0, 2.0):
        out[f"all steps, z, sigma={sigma}"] = steps_z(every, sigma)
    for sigma in (0.0, 1.0, 1.5, 2.0, 2.5, 3.0):
        out[f"mid-noise steps, z, sigma={sigma}"] = steps_z(mid, sigma)
    out["mid-noise steps, z of log then smoothed, sigma=2.0"] = steps_z(mid, 2.0, "log-smooth")
    out["mid-noise steps, z without log, sigma=2.0"] = steps_z(mid, 2.0, "smooth")
    out["mid-noise steps, z per step then mean, sigma=2.0"] = per_step_z(2.0)
    return out


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def per_image_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    scores = [
        roc_auc_score(m.ravel(), h.ravel()) for h, m in zip(maps, masks, strict=True) if 0 < m.sum() < m.size
    ]
    return float(np.mean(scores))


# --- the run ----------------------------------------------------------------------------------------------


def load_sets(data: Path, n_reference: int, n_synthetic: int, seed: int) -> tuple[list, list, list]:
    """Reference faces (as a profile: half celeba, half celeba_halfres), held-out normal faces and
    synthetic anomalies on other celeba faces."""
    celeba = list_images(data / "celeba", seed=seed)
    halfres = list_images(data / "celeba_halfres", seed=seed)
    ref_paths = celeba[: n_reference // 2] + halfres[: n_reference - n_reference // 2]
    rest = celeba[n_reference // 2 :]
    normal_paths = rest[n_synthetic : 2 * n_synthetic]
    patches = list_images(data / "dtd") + list_images(data / "cifar10")
    synthetic = list(LocalAnomalies(rest[:n_synthetic], patches, seed=seed).samples(n_synthetic))
    reference = [Image.open(p).convert("RGB") for p in ref_paths]
    normal = [Image.open(p).convert("RGB") for p in normal_paths]
    return reference, normal, synthetic


def collect(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per-step maps of the three sets (cached in --cache: the walk is the slow part)."""
    if args.cache and Path(args.cache).exists():
        with np.load(args.cache) as cached:
            out = dict(cached)
        if "abar" not in out:  # caches written before the noise levels were kept
            engine = Engine(args.model, runtime=args.runtime, options=MethodOptions())
            engine.load(warmup_batch=0)
            out["abar"] = noise_levels(engine)
        if "normal_images" not in out:  # caches written before the figure needed them
            _, normal, _ = load_sets(Path(args.data), args.reference, args.synthetic, args.seed)
            out["normal_images"] = np.stack([np.asarray(im) for im in normal[:8]])
        return out
    engine = Engine(args.model, runtime=args.runtime, options=MethodOptions())
    engine.load()
    reference, normal, synthetic = load_sets(Path(args.data), args.reference, args.synthetic, args.seed)
    size = engine.info.sample_size
    out: dict[str, np.ndarray] = {}
    for name, images in (("ref", reference), ("normal", normal), ("syn", [s.image for s in synthetic])):
        began = time.perf_counter()
        for kind, maps in step_maps(engine, images).items():
            out[f"{name}_{kind}"] = maps
        print(f"{name}: {len(images)} images in {time.perf_counter() - began:.0f} s", flush=True)
    out["abar"] = noise_levels(engine)
    out["masks"] = np.stack([mask_at(s.mask, size) for s in synthetic])
    out["syn_images"] = np.stack([np.asarray(s.image) for s in synthetic])
    out["syn_masks_full"] = np.stack([s.mask for s in synthetic])
    out["normal_images"] = np.stack([np.asarray(im) for im in normal[:8]])
    if args.cache:
        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.cache, **out)
    return out


def evaluate(maps: dict[str, np.ndarray], fpr: float = 0.05) -> list[dict]:
    """Every candidate on every map kind (other kinds only with the product's recipe). Choices were made on
    the first half of the synthetic set (``dev``); the second half (``report``) was not looked at for them."""
    rows = []
    masks = maps["masks"]
    half = len(masks) // 2
    for kind in MAP_KINDS:
        for name, build in candidates(maps["abar"]).items():
            if kind != "amp" and name != PRODUCT:
                continue
            ref, syn, normal = (
                build(maps[f"ref_{kind}"], maps[f"{s}_{kind}"]) for s in ("ref", "syn", "normal")
            )
            # the profile's threshold-equivalent: the hottest pixel of only `fpr` of reference images is above
            hot = float(np.quantile(ref.max(axis=(1, 2)), 1 - fpr))
            row = {
                "map": kind,
                "candidate": name,
                "pixel_auroc": pixel_auroc(syn, masks),
                "pixel_auroc_dev": pixel_auroc(syn[:half], masks[:half]),
                "pixel_auroc_report": pixel_auroc(syn[half:], masks[half:]),
                "per_image_pixel_auroc": per_image_auroc(syn, masks),
                # image level: is a face with a patch hotter than a normal face (its hottest pixel)?
                "image_auroc_of_max": float(
                    roc_auc_score(
                        np.r_[np.zeros(len(normal)), np.ones(len(syn))],
                        np.r_[normal.max(axis=(1, 2)), syn.max(axis=(1, 2))],
                    )
                ),
                "hot": hot,
                "normal_faces_cool": float((normal.max(axis=(1, 2)) <= hot).mean()),
                "patches_hot": float(np.mean([(m[k] > hot).any() for m, k in zip(syn, masks, strict=True)])),
                "patch_hottest_inside": float(
                    np.mean([k.ravel()[m.argmax()] for m, k in zip(syn, masks, strict=True)])
                ),
            }
            rows.append(row)
            print(
                kind,
                name,
                json.dumps({k: v for k, v in row.items() if k not in ("map", "candidate")}),
                flush=True,
            )
    return rows


def product_maps(maps: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The raw map the service computes (mean |a_k| over the mid-noise steps) of one set."""
    mid = (maps["abar"] >= MID_NOISE[0]) & (maps["abar"] <= MID_NOISE[1])
    return maps[f"{name}_amp"][:, mid].mean(1)


def drawn(calibration: HeatmapCalibration, z: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """The colour-scale values the service draws: each calibrated map lifted to its image's floor."""
    return np.stack([calibration.colour_scale(m, f) for m, f in zip(z, floors, strict=True)])


def verdict_summary(
    maps: dict[str, np.ndarray],
    calibration: HeatmapCalibration,
    profile: Profile,
    syn: np.ndarray,
    normal: np.ndarray,
) -> dict:
    """The maps as drawn (explain.verdict_floor: a flagged image's map lifted so its peak is at least
    ``hot``, mid-scale): pixel AUROC of the drawn values, and whether any flagged image draws its peak
    below mid-scale; for comparison, the rejected floor that grows with the score (0 at the median normal
    score, ``hot`` at the threshold, up to twice ``hot``)."""
    typical = float(np.median(profile.calibration_scores))
    out: dict = {"threshold": profile.threshold, "typical_score": typical}
    drawn_sets = {}
    for name, z in (("syn", syn), ("normal", normal)):
        scores = profile.score(maps[f"{name}_features"])
        flagged = scores > profile.threshold
        drawn_sets[name] = drawn(calibration, z, np.array([calibration.verdict_floor(f) for f in flagged]))
        peaks = drawn_sets[name].max(axis=(1, 2))
        out[f"{name}_flagged"] = float(flagged.mean())
        out[f"{name}_flagged_drawn_below_mid"] = int((peaks[flagged] < 0.5).sum())
        out[f"{name}_flagged_dark_without_floor"] = int((z.max(axis=(1, 2))[flagged] < calibration.hot).sum())
    masks, half = maps["masks"], len(maps["masks"]) // 2
    scores = profile.score(maps["syn_features"])
    graded = np.clip(
        calibration.hot * (scores - typical) / (profile.threshold - typical), 0, 2 * calibration.hot
    )
    out["pixel_auroc_drawn_score_floor"] = pixel_auroc(drawn(calibration, syn, graded), masks)
    out["pixel_auroc_drawn"] = pixel_auroc(drawn_sets["syn"], masks)
    out["pixel_auroc_drawn_report"] = pixel_auroc(drawn_sets["syn"][half:], masks[half:])
    out["normal_faces_cool_drawn"] = float((drawn_sets["normal"].max(axis=(1, 2)) < 0.5).mean())
    return out


def product_summary(maps: dict[str, np.ndarray], profile: Profile) -> dict:
    """The service's own code path: a profile's calibration fitted on the reference maps, applied to the
    synthetic and normal sets; and whether the engine's served map is the one studied."""
    calibration = fit_heatmap_calibration(product_maps(maps, "ref"))
    syn, normal, masks = (
        calibration.apply(product_maps(maps, "syn")),
        calibration.apply(product_maps(maps, "normal")),
        maps["masks"],
    )
    half = len(masks) // 2
    return {
        **verdict_summary(maps, calibration, profile, syn, normal),
        "served_map_is_product": bool(
            np.allclose(maps["syn_served"], product_maps(maps, "syn"), rtol=1e-4, atol=1e-7)
        ),
        "sigma": calibration.sigma,
        "hot": calibration.hot,
        "pixel_auroc": pixel_auroc(syn, masks),
        "pixel_auroc_report": pixel_auroc(syn[half:], masks[half:]),
        "normal_faces_cool": float((normal.max(axis=(1, 2)) <= calibration.hot).mean()),
        "patches_hot": float(
            np.mean([(m[k] > calibration.hot).any() for m, k in zip(syn, masks, strict=True)])
        ),
    }


def figure(maps: dict[str, np.ndarray], path: str, profile: Profile, rows: int = 5) -> None:
    """Original | served heat map (the PNG the service draws, over the image) | mask, for ``rows``
    synthetic anomalies and two normal faces, on the profile's one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = fit_heatmap_calibration(product_maps(maps, "ref"))
    scores = {name: profile.score(maps[f"{name}_features"]) for name in ("syn", "normal")}
    picks = [("patch", i) for i in range(rows)] + [("normal", 0), ("normal", 1)]
    fig, axes = plt.subplots(len(picks), 3, figsize=(6, 2 * len(picks)))
    for row, (kind, i) in enumerate(picks):
        if kind == "patch":
            image, mask, raw = maps["syn_images"][i], maps["syn_masks_full"][i], product_maps(maps, "syn")[i]
        else:
            image, mask, raw = (
                maps["normal_images"][i],
                np.zeros(maps["normal_images"][i].shape[:2]),
                product_maps(maps, "normal")[i],
            )
        score = float(scores["syn" if kind == "patch" else "normal"][i])
        floor = calibration.verdict_floor(score > profile.threshold)
        png = heatmap_png(
            raw, (image.shape[1], image.shape[0]), calibration=calibration, opacity=1.0, floor=floor
        )
        overlay = Image.alpha_composite(Image.fromarray(image).convert("RGBA"), Image.open(io.BytesIO(png)))
        for ax, shown, title in zip(
            axes[row],
            (image, overlay, mask),
            ("original", "heat map", "mask" if kind == "patch" else "normal face"),
            strict=True,
        ):
            ax.imshow(
                shown, cmap="gray" if shown is mask else None, vmin=0, vmax=1 if shown is mask else None
            )
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0 or kind == "normal":
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--model", default="model_store/celeba32-ref")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--reference", type=int, default=300, help="reference faces for per-pixel statistics")
    p.add_argument(
        "--synthetic", type=int, default=300, help="faces with a pasted patch (and as many normal)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="npz of the per-step maps (reused when present)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--figure", help="write an examples figure (original | heat map | mask) here")
    args = p.parse_args()
    maps = collect(args)
    rows = evaluate(maps)
    profile = Profile.load(Path(args.model) / "profiles" / "default.json")  # the shipped verdicts
    product = product_summary(maps, profile)
    print("product", json.dumps(product), flush=True)
    if args.figure:
        figure(maps, args.figure, profile)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "cache"},
                    "product": product,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
