"""Request and response bodies (pydantic, no FastAPI): the wire contract, shared with ``app.client``."""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.engine.calibration.limits import MAX_FPRS, PROFILE_NAME, ProfileAggregation

# The exact rules the handlers apply, published so generated clients can check before sending
# (docs/API.md, "Limits"). Image-count caps depend on settings and are filled in by ``app.web.openapi``.
PROFILE_NAME_PATTERN = f"^{PROFILE_NAME.pattern}$"
PROFILE_NAME_MAX = 81  # 64 + '.' + 16
ProfileName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=PROFILE_NAME_MAX,
        pattern=PROFILE_NAME_PATTERN,
        description="letters, digits, '_' '-', optionally one '.suffix'; starts with a letter or digit",
    ),
]
FalsePositiveRate = Annotated[float, Field(gt=0.0, lt=1.0)]


def _example_png() -> str:
    """A real 16x16 PNG so the OpenAPI examples can be sent as they are."""
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    image.putdata([(16 * x, 16 * y, 128) for y in range(16) for x in range(16)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


EXAMPLE_PNG_B64 = _example_png()


# --- requests -------------------------------------------------------------------------------------------
class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        None, min_length=1, max_length=200, description="echoed in the result; default: the index"
    )
    data: str = Field(
        min_length=1,
        description="the encoded image file, base64 (standard or URL-safe alphabet; a data: URL works)",
        json_schema_extra={"contentEncoding": "base64"},
    )


class ScoreRequest(BaseModel):
    """JSON form of ``POST /v1/score``; the multipart form takes the same options as form fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [{"id": "face-1", "data": EXAMPLE_PNG_B64}]}]},
    )

    images: list[ImageIn] = Field(min_length=1)
    profile: ProfileName | None = Field(None, description="calibration profile; default: the service default")
    explain: bool | None = Field(None, description="add a heat-map PNG per image")
    features: bool | None = Field(None, description="add the feature vector and per-timestep statistics")


class ProfileRequest(BaseModel):
    """JSON form of ``POST /v1/profiles``."""

    model_config = ConfigDict(extra="forbid")

    name: ProfileName
    images: list[ImageIn] = Field(min_length=1, description="normal images of the new domain (10 or more)")
    fprs: list[FalsePositiveRate] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FPRS - 1,  # default_fpr is always kept as well
        description="false-positive rates to keep thresholds for (default_fpr is added)",
    )
    default_fpr: float = Field(0.05, gt=0.0, lt=1.0, description="the rate whose threshold decides")
    overwrite: bool = False
    source: str = Field("", max_length=500, description="free text: where the images came from")
    aggregation: ProfileAggregation | None = Field(
        None,
        description="the profile's features: auto (chosen from these images alone, docs/METHOD.md) or one "
        "named; default: the service's DDM_AGGREGATION",
    )


# --- responses ------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(examples=["queue_full"])
    message: str = Field(examples=["queue full (256 of 256 images waiting)"])
    request_id: str = Field(examples=["5f0c6d2b9a8e4f7c"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class FeatureDetail(BaseModel):
    vector: list[float | None] = Field(description="the method's feature vector (null where not finite)")
    timesteps: list[int]
    step_sums: list[list[float | None]] = Field(description="(K, 3) per-timestep power sums 1..3")
    delta_sums: list[list[float | None]] = Field(description="(K-1, 3) the same for the step-to-step change")
    heatmap: list[list[float | None]] = Field(
        description="(H, W) at the model's resolution, what explain=true draws: per-pixel z-scores against "
        "the profile's normal images (0: typical), or the raw map for a profile without heat-map statistics"
    )
    heatmap_threshold: float | None = Field(
        description="the profile's threshold-equivalent on that map (drawn at mid-scale); null when the "
        "profile has no heat-map statistics"
    )


class ImageScore(BaseModel):
    id: str
    score: float | None = Field(description="-log density of the features; null when not finite")
    threshold: float = Field(description="score threshold at the profile's default false-positive rate")
    is_anomaly: bool
    percentile: float = Field(description="share (%) of the calibration set scoring at or below")
    p_value: float = Field(description="conformal p-value against the calibration set")
    thresholds: dict[str, float] = Field(description="false-positive rate -> threshold")
    heatmap_png: str | None = Field(
        None, description="base64 RGBA PNG the size of the upload, over the region the model scored"
    )
    features: FeatureDetail | None = None


class ModelRef(BaseModel):
    id: str
    method: str
    steps: int
    device: str
    dtype: str
    runtime: str = Field("torch", description="what computed the UNet: torch or onnxruntime")


class ProfileRef(BaseModel):
    name: str
    created: str
    default_fpr: float
    n_reference: int


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float = Field(description="from queueing to the start of the request's first batch")
    compute_ms: float = Field(description="model time of the batches the request's images were in")
    total_ms: float
    batches: int


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "5f0c6d2b9a8e4f7c",
                    "model": {
                        "id": "celeba32-ref@ecaff7b26f72",
                        "method": "diffpath-v2",
                        "steps": 10,
                        "device": "cpu",
                        "dtype": "float32",
                        "runtime": "torch",
                    },
                    "profile": {
                        "name": "default",
                        "created": "2025-01-01T00:00:00+00:00",
                        "default_fpr": 0.05,
                        "n_reference": 2000,
                    },
                    "results": [
                        {
                            "id": "face-1",
                            "score": 21.7,
                            "threshold": 25.3,
                            "is_anomaly": False,
                            "percentile": 61.2,
                            "p_value": 0.39,
                            "thresholds": {"0.01": 31.0, "0.05": 25.3},
                            "heatmap_png": None,
                            "features": None,
                        }
                    ],
                    "timings": {
                        "decode_ms": 1.2,
                        "queue_ms": 10.4,
                        "compute_ms": 180.0,
                        "total_ms": 195.0,
                        "batches": 1,
                    },
                }
            ]
        }
    )

    request_id: str
    model: ModelRef
    profile: ProfileRef
    results: list[ImageScore] = Field(description="one per image, in request order")
    timings: Timings


class ProfileSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    model_id: str
    created: str
    n_reference: int
    default_fpr: float
    thresholds: dict[str, float]
    density: str
    options: dict[str, Any]
    source: str = ""
    fpr_intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="per threshold (keyed like thresholds): the 95% interval of its true false-positive "
        "rate on new normal images, from the number of reference images",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="thresholds whose true false-positive rate may be over twice the stated one (too few "
        "reference images for that rate)",
    )


class RefusedProfile(BaseModel):
    name: str
    reason: str


class ModelCard(BaseModel):
    id: str
    name: str
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
    runtime: str = Field("torch", description="what computes the UNet (DDM_RUNTIME)")
    options: dict[str, Any] = Field(description="method options every profile must match")
    default_profile: str
    profiles: list[ProfileSummary]
    refused_profiles: list[RefusedProfile] = Field(description="profiles on disk this model cannot use")


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str = Field(examples=["ready"], description="live | loading | ready | failed | draining")
    live: bool
    ready: bool
    model_id: str | None = None
