"""``POST /v1/score``: one or many images judged against a calibration profile."""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request

from app.service.results import ImageResult, ScoreOutcome
from app.web.deadline import ScoreDeadline
from app.web.deps import Admission, ClientAccess, RequestId, ServiceDep, SettingsDep
from app.web.errors import error_responses
from app.web.openapi import request_body
from app.web.schemas import (
    PROFILE_NAME_MAX,
    PROFILE_NAME_PATTERN,
    FeatureDetail,
    ImageScore,
    ModelRef,
    ProfileRef,
    ScoreRequest,
    ScoreResponse,
    Timings,
)
from app.web.uploads import form_flag, read_upload, until_disconnected

router = APIRouter(tags=["scoring"])

SCORE_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "profile": {
        "type": "string",
        "minLength": 1,
        "maxLength": PROFILE_NAME_MAX,
        "pattern": PROFILE_NAME_PATTERN,
        "description": "calibration profile (default: the service default)",
    },
    "explain": {"type": "boolean", "description": "add a heat-map PNG per image"},
    "features": {"type": "boolean", "description": "add feature vectors and per-timestep statistics"},
}


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    dependencies=[ClientAccess, Admission],
    responses=error_responses(400, 401, 404, 409, 413, 415, 422, 500, 503, 504),
    openapi_extra=request_body(ScoreRequest, SCORE_FORM_FIELDS, [], raw_image=True),
    summary="Score images for anomaly",
)
async def score(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    request_id: RequestId,
    deadline: ScoreDeadline,
    profile: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=PROFILE_NAME_MAX,
            pattern=PROFILE_NAME_PATTERN,
            description="calibration profile",
        ),
    ] = None,
    explain: Annotated[bool, Query(description="add a heat-map PNG per image")] = False,
    features: Annotated[bool, Query(description="add feature vectors and per-timestep statistics")] = False,
) -> ScoreResponse:
    """Send images as multipart ``files`` parts, as JSON ``{"images": [{"id", "data": base64}]}``, or one
    raw image body. Options come from the query, from form fields, or from the JSON body (the body wins).
    Results keep request order. Past the deadline the answer is 504; a full queue answers 503 with
    Retry-After at once."""
    upload = await deadline.read(read_upload(request, ScoreRequest, settings.max_images_per_request))
    body = upload.body if isinstance(upload.body, ScoreRequest) else None
    chosen_profile = _first(body and body.profile, upload.fields.get("profile"), profile)
    want_explain = bool(_first(body and body.explain, form_flag(upload.fields, "explain"), explain))
    want_features = bool(_first(body and body.features, form_flag(upload.fields, "features"), features))
    scoring = service.score(
        upload.images,
        profile=chosen_profile,
        explain=want_explain,
        heatmaps=want_features,
        deadline=deadline.at,
    )
    outcome = await until_disconnected(request, scoring)
    return score_response(outcome, request_id, want_features)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def score_response(outcome: ScoreOutcome, request_id: str, with_features: bool) -> ScoreResponse:
    model, profile, t = outcome.model, outcome.profile, outcome.timings
    return ScoreResponse(
        request_id=request_id,
        model=ModelRef(
            id=model.model_id,
            method=outcome.options.method,
            steps=outcome.options.steps,
            device=model.device,
            dtype=model.dtype,
            runtime=model.runtime,
        ),
        profile=ProfileRef(
            name=profile.name,
            created=profile.created,
            default_fpr=profile.default_fpr,
            n_reference=profile.n_reference,
        ),
        results=[_image_score(r, with_features, outcome.heatmap_threshold) for r in outcome.results],
        timings=Timings(
            decode_ms=1000 * t.decode_s,
            queue_ms=1000 * t.queue_s,
            compute_ms=1000 * t.compute_s,
            total_ms=1000 * t.total_s,
            batches=t.batches,
        ),
    )


def _image_score(result: ImageResult, with_features: bool, heatmap_threshold: float | None) -> ImageScore:
    v, stats, heat = result.verdict, result.stats, result.heatmap
    detail = None
    if with_features and heat is not None:  # the service calibrated the map (``heatmaps``)
        detail = FeatureDetail(
            vector=_finite(stats.features.tolist()),
            timesteps=[int(t) for t in stats.timesteps.tolist()],
            step_sums=[_finite(row) for row in stats.step_sums.tolist()],
            delta_sums=[_finite(row) for row in stats.delta_sums.tolist()],
            heatmap=[_finite(row) for row in np.round(heat, 4).tolist()],
            heatmap_threshold=heatmap_threshold,
        )
    return ImageScore(
        id=result.id,
        score=v.score,
        threshold=v.threshold,
        is_anomaly=v.is_anomaly,
        percentile=v.percentile,
        p_value=v.p_value,
        thresholds=v.thresholds,
        heatmap_png=base64.b64encode(result.heatmap_png).decode() if result.heatmap_png else None,
        features=detail,
    )


def _finite(values: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity: non-finite numbers travel as null."""
    return [float(x) if math.isfinite(x) else None for x in values]
