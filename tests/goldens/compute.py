"""What the golden files pin, computed from scratch (shared by ``regenerate.py`` and tests/test_goldens.py).

``engine.json``: for the committed images in ``images/`` and the shipped model (``model_store/celeba32-ref``)
under the default settings (K = 10, per-step centre/border features): what preprocessing hands the model,
every method's feature vector on both runtimes (torch and onnxruntime), and the scores and verdicts the
committed default profile gives; plus a few non-default option sets (``VARIANTS``) on one runtime.

``calibration.json``: ``fit_profile`` on a fixed small feature array (stored in the file itself, so a change
of numpy's random streams cannot move it): thresholds, cross-fitted calibration scores and probe scores for
each density (Gaussian mixture on per-step and on summed features, 1-D KDE, direct score).

Numbers are rounded to ``DIGITS`` significant digits so that a diff in review stays readable; the tests
compare with a relative tolerance far above that rounding.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.methods import METHODS
from app.engine.types import MethodOptions

GOLDENS = Path(__file__).resolve().parent
IMAGES = GOLDENS / "images"
ENGINE_FILE = GOLDENS / "engine.json"
CALIBRATION_FILE = GOLDENS / "calibration.json"
REPO = GOLDENS.parent.parent
SHIPPED_MODEL = REPO / "model_store" / "celeba32-ref"
DEFAULT_PROFILE = SHIPPED_MODEL / "profiles" / "default.json"
RUNTIMES = ("torch", "onnxruntime")
DIGITS = 10
# Non-default option sets whose features are pinned too (diffpath-v2, onnxruntime): each moves a code path
# the default leaves at a neutral value (ssim_lambda = 1, image SSIM target, DDIM walk, noise units).
VARIANTS: dict[str, dict[str, Any]] = {
    "ssim_lambda=2.5": {"ssim_lambda": 2.5},
    "ssim_weighting=dissimilarity": {"ssim_weighting": "dissimilarity"},
    "ssim_target=noise": {"ssim_target": "noise"},
    "trajectory=forward": {"trajectory": "forward"},
    "sigma_scaling": {"sigma_scaling": True},
    "t_max_fraction=0.5,steps=6": {"t_max_fraction": 0.5, "steps": 6},
    # the default before per-step-centre: what profiles fitted then still compute
    "aggregation=per-step": {"aggregation": "per-step"},
    # METHOD.md's six sums: the only aggregation with odd powers of the Stein error, where its sign shows
    "aggregation=sum": {"aggregation": "sum"},
}
VARIANT_RUNTIME = "onnxruntime"


def rounded(value: Any) -> Any:
    """Floats (also inside lists/dicts/arrays) to DIGITS significant digits, for stable, readable JSON."""
    if isinstance(value, np.ndarray):
        return rounded(value.tolist())
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(f"{float(value):.{DIGITS}g}")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def image_files() -> list[Path]:
    files = sorted(IMAGES.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no golden images in {IMAGES}")
    return files


# --- engine ----------------------------------------------------------------------------------------------
def load_engine(runtime: str, options: MethodOptions | None = None) -> Any:
    from app.engine.engine import Engine

    engine = Engine(SHIPPED_MODEL, device="cpu", runtime=runtime, options=options or MethodOptions())
    engine.load(warmup_batch=0)
    return engine


def inputs_section(engine: Any) -> dict[str, Any]:
    """What preprocessing hands the model, per image: content digest (seeds the noise) and range."""
    out = {}
    for path in image_files():
        data = path.read_bytes()
        prepared = engine.decode(data)
        t = prepared.tensor.double()
        out[path.name] = {
            "png_sha256": hashlib.sha256(data).hexdigest(),
            "digest": prepared.digest.hex(),
            "shape": list(prepared.tensor.shape),
            "min": float(t.min()),
            "max": float(t.max()),
            "mean": float(t.mean()),
            "std": float(t.std()),
        }
    return out


def runtime_section(engine: Any) -> dict[str, Any]:
    """Every method's features (one batch of all images) and the default profile's verdicts."""
    from app.engine.calibration.profile import Profile

    names = [p.name for p in image_files()]
    images = [engine.decode(p.read_bytes()) for p in image_files()]
    stats = engine.image_stats_by_method(images, METHODS)
    profile = Profile.load(DEFAULT_PROFILE, engine.info.model_id, engine.options)
    verdicts = profile.verdicts(stats[engine.options.method])
    return {
        "features": {m: {n: s.features for n, s in zip(names, stats[m], strict=True)} for m in METHODS},
        "default_profile": {
            n: {
                "score": v.score,
                "threshold": v.threshold,
                "is_anomaly": v.is_anomaly,
                "percentile": v.percentile,
                "p_value": v.p_value,
            }
            for n, v in zip(names, verdicts, strict=True)
        },
    }


def variant_section(options: MethodOptions, engine: Any) -> dict[str, Any]:
    names = [p.name for p in image_files()]
    images = [engine.decode(p.read_bytes()) for p in image_files()]
    stats = engine.image_stats(images)
    return {
        "options": options.feature_key(),
        "features": {n: s.features for n, s in zip(names, stats, strict=True)},
    }


def variant_options(overrides: dict[str, Any]) -> MethodOptions:
    return MethodOptions(**overrides)


def engine_goldens() -> dict[str, Any]:
    out: dict[str, Any] = {}
    engines = {runtime: load_engine(runtime) for runtime in RUNTIMES}
    first = engines[RUNTIMES[0]]
    out["model_id"] = first.info.model_id
    out["options"] = first.options.feature_key()
    out["inputs"] = inputs_section(first)
    out["runtimes"] = {}
    for runtime, engine in engines.items():
        assert engine.info.runtime == runtime, (engine.info.runtime, runtime)
        out["runtimes"][runtime] = runtime_section(engine)
    out["variants"] = {}
    for name, overrides in VARIANTS.items():
        options = variant_options(overrides)
        out["variants"][name] = variant_section(options, with_options(engines[VARIANT_RUNTIME], options))
    return rounded(out)


def with_options(engine: Any, options: MethodOptions) -> Any:
    """A second Engine on the same loaded model with other method options (no second load or export)."""
    other = copy.copy(engine)
    other.options = options
    return other


# --- calibration -------------------------------------------------------------------------------------------
def calibration_input() -> np.ndarray:
    """60 x 4 features from two clusters (what regenerate.py stores; the tests read the stored copy)."""
    rng = np.random.default_rng(19)
    a = rng.normal([0.0, 1.0, 2.0, -1.0], [1.0, 0.5, 2.0, 0.3], size=(40, 4))
    b = rng.normal([3.0, -1.0, 0.5, 0.0], [0.5, 1.0, 0.5, 0.8], size=(20, 4))
    return np.asarray(rounded(np.concatenate([a, b])))


PROBES = [[0.0, 1.0, 2.0, -1.0], [3.0, -1.0, 0.5, 0.0], [1.5, 0.0, 1.0, -0.5], [8.0, 8.0, -8.0, 8.0]]
CALIBRATION_CASES: dict[str, dict[str, Any]] = {
    "diffpath-v2 per-step": {"method": "diffpath-v2", "aggregation": "per-step"},
    "diffpath-v2 sum": {"method": "diffpath-v2", "aggregation": "sum"},
    "diffpath-v2 diag": {"method": "diffpath-v2", "covariance_type": "diag"},
    "diffpath-1d": {"method": "diffpath-1d"},
    "reconstruction": {"method": "reconstruction"},
}


def calibration_case(features: np.ndarray, overrides: dict[str, Any]) -> dict[str, Any]:
    from app.engine.calibration.fit import fit_profile

    options = MethodOptions(**overrides)
    columns = 1 if options.method == "diffpath-1d" else features.shape[1]
    profile = fit_profile("golden", features[:, :columns], model_id="golden@0", options=options)
    summary = profile.summary()
    return {
        "options": overrides,
        "thresholds": profile.thresholds,
        "calibration_scores": profile.calibration_scores,
        "probe_scores": profile.score(np.asarray(PROBES)[:, :columns]),
        "density": {
            k: summary[k] for k in ("density", "mixture_components", "covariance_type") if k in summary
        },
    }


def calibration_goldens(features: np.ndarray | None = None) -> dict[str, Any]:
    features = calibration_input() if features is None else features
    return rounded(
        {
            "features": features,
            "probes": PROBES,
            "cases": {name: calibration_case(features, o) for name, o in CALIBRATION_CASES.items()},
        }
    )
