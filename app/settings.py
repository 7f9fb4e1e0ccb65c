"""The one configuration object, built once at start-up and passed down; nothing else reads the env."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.engine.calibration.limits import ProfileAggregation

DEFAULT_MODEL_DIR = Path("model_store/celeba32-ref")


def shipped_model_dir() -> Path:
    """The shipped model: ``model_store/celeba32-ref`` of the working directory (the container's /opt/ddm),
    else the one beside the source tree (a clone installed with ``pip install -e``), so the commands work
    from any folder."""
    beside_source = Path(__file__).resolve().parent.parent / DEFAULT_MODEL_DIR
    return beside_source if not DEFAULT_MODEL_DIR.is_dir() and beside_source.is_dir() else DEFAULT_MODEL_DIR


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (cpusets, ``docker --cpuset-cpus``) capped by a cgroup
    v2 CPU quota (``docker --cpus``, Kubernetes limits), at least 1. ``DDM_MODEL_INSTANCES=auto`` sizes the
    service to the host with it."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, int(quota) // int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, count)


class Settings(BaseSettings):
    """Service and engine settings; every field can be set as ``DDM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DDM_", env_file=None, extra="ignore")

    # --- model and method -------------------------------------------------------------------------
    model_dir: Path = Field(
        default_factory=shipped_model_dir,
        description="diffusers folder with unet/ and scheduler/ (default: the shipped model, any cwd)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = float32 on CPU, bfloat16 autocast on CUDA"
    )
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what computes the UNet: torch, or onnxruntime (the UNet exported to ONNX at start-up; "
        "CPU, float32); auto = onnxruntime for float32 on CPU, else torch",
    )
    method: str = Field(
        "diffpath-v2", description="scoring method: a registered one (app/engine/methods; see METHOD.md)"
    )
    steps: int = Field(10, ge=2, le=1000, description="trajectory steps K (UNet evaluations per image)")
    aggregation: ProfileAggregation = Field(
        "auto",
        description="the features of new calibration profiles: auto = chosen from the profile's own normal "
        "images (docs/METHOD.md, Choosing features); per-step-centre = per-step log energies of the image's "
        "centre and border; per-step-centre+embedding = those and the UNet's embedding (channel means) as "
        "two experts; per-step-centre+embedding+spread = the same with the channels' spreads too; "
        "per-step = whole-image energies; sum = METHOD.md's six sums. Each profile keeps its own",
    )
    trajectory: Literal["ddim", "forward", "diffpath"] = Field(
        "ddim",
        description="the path the features are read along: ddim (DDIM inversion, K steps evenly over the "
        "schedule), diffpath (DiffPath's own loop: respaced grid range(0, T, T/K), float64 coefficients, "
        "last move to abar = 0) or forward (noising x0 directly); profiles are bound to it",
    )
    profiles_dir: Path | None = Field(
        None, description="where calibration profiles live; default <model_dir>/profiles"
    )
    default_profile: str = "default"
    torch_threads: int | None = Field(None, ge=1, description="intra-op CPU threads; None = torch default")
    model_instances: int = Field(
        1,
        ge=1,
        le=64,
        description="batches computed at the same time, each by its own worker thread on the one shared "
        "model (Triton's instance_group count); on CPU each uses DDM_TORCH_THREADS threads; auto = the CPUs "
        "this process may use",
    )
    warmup: bool = True

    # --- batching ----------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_batch_delay_ms: float = Field(10.0, ge=0.0, le=10_000.0)
    max_queue_images: int = Field(256, ge=1)
    request_timeout_s: float = Field(60.0, gt=0.0)
    min_request_timeout_s: float = Field(
        1.0,
        gt=0.0,
        description="the shortest deadline a client may ask for (?timeout_s); shorter ones are refused with "
        "422 instead of a certain 504. Published in the OpenAPI schema",
    )

    # --- input limits ------------------------------------------------------------------------------
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_request_pixels: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="decoded pixels of all images of one request together (413 above it): decoding is "
        "CPU-bound, so the per-image cap alone lets one request hold the decoders for a minute",
    )
    max_images_per_request: int = Field(64, ge=1)
    max_profile_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="body cap of POST /v1/profiles with an admin key (many reference images: 5000 64x64 "
        "PNGs are about 60 MB); a creation holds about three times its body at its peak",
    )
    profile_creations: int = Field(
        1,
        ge=1,
        le=64,
        description="profile creations at a time (body upload to fitted profile); one more is refused "
        "before its body is read with 503 queue_full and Retry-After, so memory stays bounded",
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding uploads and encoding heat maps")
    max_decode_queue_images: int = Field(
        256,
        ge=1,
        description="images admitted for decoding at a time (waiting or being decoded, across requests); "
        "a request that does not fit is refused with 503 queue_full and Retry-After",
    )
    heatmap_max_side: int = Field(1024, ge=16, description="longest side of a returned heat-map PNG")
    score_buckets: Annotated[list[float] | None, NoDecode] = Field(
        None,
        description="upper bounds of the anomaly_score histogram's buckets (comma-separated); default: "
        "dense around the shipped model's threshold (app/service/metrics.py); set them around another "
        "model's normal scores and threshold",
    )
    allowed_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]
    )

    # --- security ----------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer tokens for scoring and metadata; empty = scoring is open",
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer tokens for profile administration (create, overwrite, delete); "
        "they also score. Scoring keys are refused there (403); empty = administration needs no key only "
        "with DDM_ALLOW_OPEN_PROFILE_CREATION (creation only) and no keys of either kind",
    )
    allow_open_profile_creation: bool = Field(
        False,
        description="allow POST /v1/profiles without a key when no keys are configured; such anonymous "
        "creations get the scoring body cap and deadline",
    )
    max_profile_images: int = Field(5000, ge=1)

    # --- test hook ---------------------------------------------------------------------------------

    # --- server ------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text lines, or JSON lines (one object per record: time, level, logger, message, "
        "request_id) for log pipelines",
    )
    drain_timeout_s: float = Field(30.0, ge=0.0, description="how long SIGTERM waits for accepted work")
    exit_on_load_failure: bool = Field(
        True,
        description="exit with status 1 when the model fails to load (an orchestrator then restarts the pod "
        "and shows the crash), as Triton does; false keeps the process up, live and never ready",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="addresses of proxies whose X-Forwarded-For/-Proto headers are trusted (comma-separated, "
        "or *); empty = those headers are ignored and the access log shows the peer's address",
    )
    keep_alive_timeout_s: float = Field(
        75.0,
        ge=1.0,
        description="idle keep-alive connections are closed after this; longer than a load balancer's idle "
        "timeout (60 s on common ones), so a client never reuses a connection the server is closing",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0.0,
        le=300.0,
        description="after SIGTERM, keep listening this long with /readyz at 503 (new work refused) so load "
        "balancers stop routing here, then drain and exit",
    )

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        # imported here: the registry loads the methods (torch); `ddm-anomaly --help` must not wait for it
        from app.engine.methods import names as method_names

        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; registered: {', '.join(method_names())}")
        return value

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip().upper() for v in value.split(",") if v.strip()]
        return value

    @field_validator("model_instances", mode="before")
    @classmethod
    def _auto_instances(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return min(usable_cpus(), 64)  # the field's bound
        return value

    @field_validator("score_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return sorted(float(v) for v in value.split(",") if v.strip()) or None
        return value

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def profiles_folder(self) -> Path:
        """Where calibration profiles live: ``profiles_dir``, else ``<model_dir>/profiles``."""
        return self.profiles_dir or self.model_dir / "profiles"
