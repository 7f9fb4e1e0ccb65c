"""Candidate features and densities for benchmarks/feature_search.py, computed from its cache (no model).

A candidate pools the per-step energies of the amplified error a_k = e_k * (1 + (1 - S_k)) and of its rate
of change da_k = (a_{k+1} - a_k) * K over regions instead of over the whole image:

* colour: ``sum`` (all channels, today's feature), ``rgb`` (each channel), ``opp`` (an orthonormal
  luminance / red-green / yellow-blue basis, so the three energies still add up to today's);
* place: ``all``, ``cb`` (centre 16x16 vs border), ``grid2`` / ``grid4`` (2x2 / 4x4 blocks);
* frequency: ``bandsN`` (energy of the orthonormal 2-D DCT in N radial bands; Parseval keeps the total).

Features are the log of each pooled energy (as the engine's per-step features), steps then rates of change.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.fft import dctn
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from app.engine.calibration.density import GaussianMixtureDensity

OOD_SETS = ("cifar10", "mnist", "dtd", "imagenet")
FLOOR = 1e-12
OPPONENT = np.array(
    [
        [1 / math.sqrt(3)] * 3,
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ]
)


@dataclass(frozen=True)
class Candidate:
    colour: str = "sum"  # sum | rgb | opp
    place: str = "all"  # all | cb | grid2 | grid4 | bands4 | bands8
    deltas: bool = True
    extra: tuple[str, ...] = ()  # "eps": the noise's per-step energies (6d); "dis": mean dissimilarity
    first_band: int = 0  # bandsN: keep bands first_band .. N - 1


def colour_transform(q: np.ndarray, colour: str) -> np.ndarray:
    """(N, K, C, H, W) -> same shape in the candidate's colour basis."""
    if colour == "opp":
        return np.einsum("oc,nkchw->nkohw", OPPONENT, q)
    return q


def radial_bands(size: int, n: int) -> np.ndarray:
    """(H, W) band index of each DCT coefficient: log-spaced radial bands, the DC term in band 0."""
    u = np.arange(size)
    radius = np.sqrt(u[:, None] ** 2 + u[None, :] ** 2)
    edges = np.r_[0.5, np.geomspace(1.0, radius.max() + 1e-6, n)[1:]]
    return np.searchsorted(edges, radius, side="right").clip(0, n - 1)


def pooled_energy(q: np.ndarray, cand: Candidate) -> np.ndarray:
    """(N, K, C, H, W) -> (N, K * P) pooled energies of q in the candidate's colour basis and regions."""
    q = colour_transform(q, cand.colour)
    n, k, c, h, w = q.shape
    if cand.place.startswith("bands"):
        bands = radial_bands(h, int(cand.place[5:]))
        energy = dctn(q, axes=(-2, -1), norm="ortho") ** 2
        kept = range(cand.first_band, bands.max() + 1)
        pooled = np.stack([energy[..., bands == b].sum(-1) for b in kept], -1)
    elif cand.place == "all":
        pooled = (q**2).sum((-2, -1))[..., None]
    elif cand.place == "cb":
        e = q**2
        centre = e[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].sum((-2, -1))
        pooled = np.stack([centre, e.sum((-2, -1)) - centre], -1)
    elif cand.place.startswith("grid"):
        g = int(cand.place[4:])
        pooled = (q**2).reshape(n, k, c, g, h // g, g, w // g).sum((-3, -1)).reshape(n, k, c, g * g)
    else:
        raise ValueError(cand.place)
    if cand.colour == "sum":
        pooled = pooled.sum(2, keepdims=True)
    return pooled.reshape(n, -1)


def path_maps(cache: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """The amplified error a_k (lambda = 1, as the engine), its rate of change, the noise and its rate."""
    a = cache["err"].astype(np.float32) * (1.0 + cache["dis"].astype(np.float32))
    eps = cache["eps"].astype(np.float32)
    return {
        "a": a,
        "da": (a[:, 1:] - a[:, :-1]) * steps,
        "eps": eps,
        "deps": (eps[:, 1:] - eps[:, :-1]) * steps,
        "dis": cache["dis"],
    }


def candidate_features(maps: dict[str, np.ndarray], cand: Candidate) -> np.ndarray:
    parts = [pooled_energy(maps["a"], cand)]
    if cand.deltas:
        parts.append(pooled_energy(maps["da"], cand))
    if "eps" in cand.extra:
        parts += [pooled_energy(maps["eps"], Candidate()), pooled_energy(maps["deps"], Candidate())]
    feats = np.log(np.maximum(np.concatenate(parts, 1).astype(np.float64), FLOOR))
    if "dis" in cand.extra:
        feats = np.concatenate([feats, np.log(maps["dis"].astype(np.float32).mean((2, 3, 4)) + 1e-6)], 1)
    return feats


# ---- densities: fit on normal features, return an anomaly score function (higher = more anomalous)


def density_gmm(fit: np.ndarray, reg: float = 0.1):
    d = GaussianMixtureDensity.fit(fit, reg_covar=reg)
    return lambda x: -d.log_density(x)


def density_lw(fit: np.ndarray):
    scaler = StandardScaler().fit(fit)
    lw = LedoitWolf().fit(scaler.transform(fit))
    return lambda x: lw.mahalanobis(scaler.transform(x))


def density_pca(fit: np.ndarray, variance: float = 0.99):
    scaler = StandardScaler().fit(fit)
    pca = PCA(n_components=variance, whiten=True, random_state=0).fit(scaler.transform(fit))
    return lambda x: (pca.transform(scaler.transform(x)) ** 2).sum(1)


def density_knn(fit: np.ndarray, k: int = 5):
    scaler = StandardScaler().fit(fit)
    pca = PCA(n_components=0.99, whiten=True, random_state=0).fit(scaler.transform(fit))
    ref = pca.transform(scaler.transform(fit))
    nn = NearestNeighbors(n_neighbors=k).fit(ref)
    return lambda x: nn.kneighbors(pca.transform(scaler.transform(x)))[0].mean(1)


DENSITIES = {"gmm": density_gmm, "lw": density_lw, "pca": density_pca, "knn": density_knn}


def auroc_se(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    """AUROC (OOD positive) and its Hanley-McNeil standard error."""
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    auc = float(roc_auc_score(y, np.nan_to_num(np.r_[id_scores, ood_scores], nan=1e300, posinf=1e300)))
    n1, n0 = len(ood_scores), len(id_scores)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    return auc, float(math.sqrt(max(var, 0.0)))


CANDIDATES: dict[str, Candidate] = {
    "per-step (today)": Candidate(),
    "per-step, no rates": Candidate(deltas=False),
    "rgb": Candidate("rgb"),
    "opp": Candidate("opp"),
    "centre/border": Candidate(place="cb"),
    "grid2": Candidate(place="grid2"),
    "grid4": Candidate(place="grid4"),
    "grid4, no rates": Candidate(place="grid4", deltas=False),
    "dct bands4": Candidate(place="bands4"),
    "dct bands8": Candidate(place="bands8"),
    "dct bands8, upper 4-7": Candidate(place="bands8", first_band=4),
    "dct bands8, upper 5-7": Candidate(place="bands8", first_band=5),
    "dct bands8, upper 6-7": Candidate(place="bands8", first_band=6),
    "dct bands8 4-7, no rates": Candidate(place="bands8", first_band=4, deltas=False),
    "dct bands16, upper 8-15": Candidate(place="bands16", first_band=8),
    "opp dct bands8 4-7": Candidate("opp", "bands8", first_band=4),
    "dct bands8 4-7 + eps": Candidate(place="bands8", first_band=4, extra=("eps",)),
    "opp dct bands4": Candidate("opp", "bands4"),
    "rgb dct bands4": Candidate("rgb", "bands4"),
    "opp grid2": Candidate("opp", "grid2"),
    "opp centre/border": Candidate("opp", "cb"),
    "per-step + eps": Candidate(extra=("eps",)),
    "per-step + dis": Candidate(extra=("dis",)),
    "opp dct bands4 + eps": Candidate("opp", "bands4", extra=("eps",)),
}


def load(cache_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(cache_dir / f"{name}.npz") as z:
        return {k: z[k] for k in ("err", "dis", "eps", "engine_features")}


def evaluate(
    feats: dict[str, np.ndarray], id_name: str, ood_suffix: str, density: str, keep: dict | None = None
) -> dict:
    score = DENSITIES[density](feats["fit"])
    id_scores = score(feats[id_name])
    if keep is not None:
        keep.update({name: score(f) for name, f in feats.items() if name != "fit"})
    row: dict = {}
    ood_scores = {ood: score(feats[f"{ood}_{ood_suffix}"]) for ood in OOD_SETS}
    for ood in OOD_SETS:
        auc, se = auroc_se(id_scores, ood_scores[ood])
        row[ood], row[f"{ood}_se"] = auc, se
    row["mean"] = float(np.mean([row[o] for o in OOD_SETS]))
    control = f"{id_name}_jpeg"
    if control in feats:
        # the same faces made as the CIFAR-10 copies were (32 px, JPEG 75, back to 64 px): a feature that
        # flags these detects how an image was made, not what it shows
        jpeg = score(feats[control])
        threshold = np.quantile(id_scores, 0.95)
        row["jpeg_faces_flagged_at_5pct"] = float((jpeg > threshold).mean())
        row["faces_vs_jpeg_faces"], _ = auroc_se(id_scores, jpeg)
        row["jpeg_faces_vs_cifar10"], row["jpeg_faces_vs_cifar10_se"] = auroc_se(jpeg, ood_scores["cifar10"])
    return row


def paired_differences(
    base: dict[str, np.ndarray], new: dict[str, np.ndarray], id_name: str, suffix: str, rounds: int = 300
) -> dict[str, list[float]]:
    """AUROC(new) - AUROC(base) per OOD set and on their mean, with a paired bootstrap standard error (the
    same resampled images score both, so the error of the difference is far below either AUROC's)."""
    rng = np.random.default_rng(0)

    def auc(scores: dict[str, np.ndarray], i: np.ndarray, ood: str, o: np.ndarray) -> float:
        return auroc_se(scores[id_name][i], scores[f"{ood}_{suffix}"][o])[0]

    full = {ood: auc(new, ..., ood, ...) - auc(base, ..., ood, ...) for ood in OOD_SETS}  # type: ignore[arg-type]
    draws: dict[str, list[float]] = {ood: [] for ood in (*OOD_SETS, "mean")}
    for _ in range(rounds):
        i = rng.integers(0, len(base[id_name]), len(base[id_name]))
        for ood in OOD_SETS:
            o = rng.integers(0, len(base[f"{ood}_{suffix}"]), len(base[f"{ood}_{suffix}"]))
            draws[ood].append(auc(new, i, ood, o) - auc(base, i, ood, o))
        draws["mean"].append(float(np.mean([draws[ood][-1] for ood in OOD_SETS])))
    full["mean"] = float(np.mean([full[ood] for ood in OOD_SETS]))
    return {k: [float(full[k]), float(np.std(v))] for k, v in draws.items()}


def run_search(args: argparse.Namespace) -> int:
    cache_dir = args.cache / f"K{args.steps}"
    suffix = "held" if args.final else "dev"
    id_name = f"{suffix}_id"
    names = ["fit", id_name] + [f"{o}_{suffix}" for o in OOD_SETS]
    if (cache_dir / f"{id_name}_jpeg.npz").exists():
        names.append(f"{id_name}_jpeg")
    caches = {n: load(cache_dir, n) for n in names}
    maps = {n: path_maps(c, args.steps) for n, c in caches.items()}
    rows = []
    scores: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for cname, cand in CANDIDATES.items():
        if args.only and cname not in args.only:
            continue
        feats = {n: candidate_features(m, cand) for n, m in maps.items()}
        if cname == "per-step (today)":  # the cache reproduces the engine's features
            gap = max(np.abs(feats[n] - caches[n]["engine_features"]).max() for n in names)
            print(f"cache vs engine per-step features: max |diff| {gap:.2e} (float16 maps)", flush=True)
        for density in args.densities:
            if density == "gmm" and feats["fit"].shape[1] > 120:
                continue  # a full covariance over >120 dims from 600 images is not a fair GMM
            row = {"candidate": cname, "dims": feats["fit"].shape[1], "density": density}
            kept: dict[str, np.ndarray] = {}
            row.update(evaluate(feats, id_name, suffix, density, kept))
            scores[cname, density] = kept
            rows.append(row)
            print(
                f"{cname:<24} {row['dims']:>4} {density:<4} "
                + " ".join(f"{row[o]:.3f}±{row[o + '_se']:.3f}" for o in OOD_SETS)
                + f"  mean {row['mean']:.4f}"
                + (
                    f"  jpeg-faces flagged {row['jpeg_faces_flagged_at_5pct']:.2f}"
                    f" cifar-vs-jpeg-faces {row['jpeg_faces_vs_cifar10']:.3f}"
                    if "jpeg_faces_vs_cifar10" in row
                    else ""
                ),
                flush=True,
            )
    compared = {}
    if args.compare:
        base, new = ((name, "gmm") for name in args.compare)
        compared = {"base": base[0], "new": new[0], "density": "gmm"}
        compared["difference"] = paired_differences(scores[base], scores[new], id_name, suffix)  # type: ignore[assignment]
        for k, (d, se) in compared["difference"].items():  # type: ignore[attr-defined]
            print(f"{new[0]} - {base[0]} ({k}): {d:+.4f} +- {se:.4f} (paired bootstrap)", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    sizes = {n: len(c["err"]) for n, c in caches.items()}
    args.json.write_text(
        json.dumps(
            {"steps": args.steps, "split": suffix, "sizes": sizes, "rows": rows, "paired": compared}, indent=2
        )
    )
    return 0
