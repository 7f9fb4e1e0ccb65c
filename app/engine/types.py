"""Plain data passed between the engine, the calibration code and the service (no torch in the API)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from app.engine.calibration.limits import Aggregation

# Options a profile chooses for itself (with ``aggregation``), whatever the service's walk.
PROFILE_OWN_DENSITY = ("mixture_max_components", "covariance_type", "covariance_reg")

# A registered method's name: the methods are plug-ins (app.engine.methods: ``names()`` lists them,
# ``get(name)`` describes one), checked where settings and profiles are read.
MethodName = str


@dataclass(frozen=True)
class MethodOptions:
    """Everything that changes the statistics of an image; a calibration profile is only valid for the
    exact options (and model) it was fitted with."""

    method: MethodName = "diffpath-v2"
    steps: int = 10  # K: UNet evaluations per image
    # "ddim": DDIM inversion on an even grid over [0, T - 1]; "forward": noising x0 directly; "diffpath":
    # DiffPath's own loop (respaced grid, float64 coefficients, last move to abar = 0; trajectory.py)
    trajectory: Literal["ddim", "forward", "diffpath"] = "ddim"
    ssim_weighting: Literal["amplify", "dissimilarity", "none"] = "amplify"
    ssim_target: Literal["image", "noise"] = "image"  # SSIM(x0, xhat0_k) or SSIM(eps_theta, eps*)
    ssim_lambda: float = 1.0
    sigma_scaling: bool = False  # divide the Stein error by sigma_k (score units instead of noise units)
    t_max_fraction: float = 1.0  # trajectory covers t in [0, t_max_fraction * (T - 1)]
    # How the path methods turn per-step power sums into features: "sum" = METHOD.md step 4's six sums
    # over all steps; "per-step" = the log energy (sum of squares) of every step and of every step's rate
    # of change, 2K - 1 values (ACCURACY.md: where along the path the error sits is what separates);
    # "per-step-centre" = the same energies of the image's centre and of its border, 2 (2K - 1) values:
    # where in an aligned face the error sits too (the default; ACCURACY.md "Where the error sits").
    aggregation: Aggregation = "per-step-centre"
    recon_levels: tuple[float, ...] = (0.1, 0.25, 0.4)  # reconstruction: noise levels as fractions of T
    mixture_max_components: int = 8
    covariance_type: Literal["full", "diag", "tied", "spherical", "auto"] = "full"
    # Added to the diagonal of each standardised covariance (shrinkage towards independent features).
    # None = the method's default (``methods.density_reg``: ``Method.default_covariance_reg``; path methods:
    # by aggregation).
    covariance_reg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "trajectory": self.trajectory,
            "ssim_weighting": self.ssim_weighting,
            "ssim_target": self.ssim_target,
            "ssim_lambda": self.ssim_lambda,
            "sigma_scaling": self.sigma_scaling,
            "t_max_fraction": self.t_max_fraction,
            "aggregation": self.aggregation,
            "recon_levels": list(self.recon_levels),
            "mixture_max_components": self.mixture_max_components,
            "covariance_type": self.covariance_type,
            "covariance_reg": self.covariance_reg,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodOptions:
        values = dict(data)
        # profiles written before the option existed were all fitted on the six sums
        values.setdefault("aggregation", "sum")
        if "recon_levels" in values:
            values["recon_levels"] = tuple(float(v) for v in values["recon_levels"])
        return cls(**values)

    def feature_key(self) -> dict[str, Any]:
        """The options that change the feature vector (density settings are the profile's own business)."""
        d = self.to_dict()
        for key in PROFILE_OWN_DENSITY:
            d.pop(key)
        return d

    def walk_key(self) -> dict[str, Any]:
        """The options that change what the walk measures: what a profile must share with the service to
        be served. The aggregation is not among them: every aggregation derives from the same sums
        (methods/aggregations.py), so each profile keeps the features it was fitted with."""
        d = self.feature_key()
        d.pop("aggregation")
        return d

    def with_profile_options(self, **changes: Any) -> MethodOptions:
        """These walk options with a profile's own choices (aggregation, density settings)."""
        unknown = set(changes) - {"aggregation", *PROFILE_OWN_DENSITY}
        if unknown:
            raise ValueError(f"not a profile's own option: {', '.join(sorted(unknown))}")
        return replace(self, **changes)


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a loaded base model, as shown by ``GET /v1/models``."""

    model_id: str  # "<folder name>@<first 12 hex of the weights' sha256>"
    name: str
    path: str
    sample_size: int
    in_channels: int
    parameters: int
    num_train_timesteps: int
    beta_schedule: str
    prediction_type: str
    scheduler_class: str
    weights_sha256: str
    device: str
    dtype: str
    runtime: str = "torch"  # what computes the UNet (runtimes.py)
    card: str = ""  # README.md of the model folder, if any

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "card"}


@dataclass
class ImageStats:
    """What the engine measures on one image; independent of any calibration profile.

    ``features``: the method's feature vector (6 for the diffpath methods, 1 for diffpath-1d, one per
    noise level for reconstruction). ``step_sums``: per-timestep sums (K, 3) of the trajectory quantity and
    its powers 1..3; ``delta_sums``: the same for its rate of change (K-1, 3). ``heatmap``: (H, W) float32
    at model resolution, mean over channels and the mid-noise steps of |quantity| (path methods; every
    step for reconstruction; methods/path_sums.py HEAT_NOISE_RANGE), uncalibrated (a profile calibrates it).
    """

    features: np.ndarray
    step_sums: np.ndarray
    delta_sums: np.ndarray
    timesteps: np.ndarray
    heatmap: np.ndarray
    finite: bool = True
    # path methods: per-step energies on a grid per channel, (K, C, G, G) and (K-1, C, G, G); a profile with
    # other feature options derives its own features from them (methods/aggregations.py)
    step_grid: np.ndarray | None = None
    delta_grid: np.ndarray | None = None
    embeddings: np.ndarray | None = None  # (K, E): the UNet's image embedding at each step
    # the aggregation ``features`` were computed under (path methods): a profile of the same aggregation
    # reads them as they are, one of another derives its own from the sums and grids
    aggregation: str | None = None


@dataclass
class Verdict:
    """One image judged against one calibration profile. ``score`` is None when it was not finite."""

    score: float | None
    threshold: float
    is_anomaly: bool
    percentile: float
    p_value: float
    thresholds: dict[str, float] = field(default_factory=dict)
