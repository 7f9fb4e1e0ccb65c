"""``GET /v1/models[/{id}]`` (model metadata and its profiles) and ``POST /v1/profiles`` (admin)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from app.engine.calibration.limits import DEFAULT_FPRS, MAX_FPRS, PROFILE_AGGREGATIONS
from app.errors import InvalidInput, Overloaded, Unauthorized
from app.service.results import ModelDescription
from app.service.scoring import ScoringService
from app.settings import Settings
from app.web.deadline import Deadline, RequestDeadline
from app.web.deps import (
    AdminAccess,
    AdminKeyAccess,
    Admission,
    ClientAccess,
    ServiceDep,
    SettingsDep,
    open_profile_creation,
)
from app.web.errors import error_responses
from app.web.openapi import request_body
from app.web.schemas import (
    PROFILE_NAME_MAX,
    PROFILE_NAME_PATTERN,
    ModelCard,
    ModelList,
    ProfileRequest,
    ProfileSummary,
)
from app.web.uploads import form_flag, read_upload, until_disconnected

router = APIRouter(tags=["models"])

# A decimal in (0, 1) per entry ("0.05", ".1", "1e-3"); the count and the range are checked by the handler.
FPRS_FIELD_PATTERN = r"^\s*[0-9.eE+-]+\s*(,\s*[0-9.eE+-]+\s*)*,?\s*$"
FPRS_FIELD_MAX = 32 * MAX_FPRS
SOURCE_MAX = 500

PROFILE_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "name": {
        "type": "string",
        "minLength": 1,
        "maxLength": PROFILE_NAME_MAX,
        "pattern": PROFILE_NAME_PATTERN,
        "description": "profile name: letters, digits, '_' '-', one '.suffix'",
    },
    "fprs": {
        "type": "string",
        "maxLength": FPRS_FIELD_MAX,
        "pattern": FPRS_FIELD_PATTERN,
        "description": f"comma-separated false-positive rates in (0, 1), at most {MAX_FPRS - 1}: 0.01,0.05",
    },
    "default_fpr": {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
        "description": "the rate whose threshold decides (default 0.05)",
    },
    "overwrite": {"type": "boolean", "description": "replace a profile of the same name"},
    "aggregation": {
        "type": "string",
        "enum": list(PROFILE_AGGREGATIONS),
        "description": "the profile's features: auto (chosen from these images) or one named; default "
        "DDM_AGGREGATION",
    },
    "source": {
        "type": "string",
        "maxLength": SOURCE_MAX,
        "description": "free text: where the images came from",
    },
}


@router.get(
    "/v1/models", response_model=ModelList, dependencies=[ClientAccess], responses=error_responses(401, 503)
)
async def list_models(service: ServiceDep) -> ModelList:
    """The loaded base model with its method options and calibration profiles."""
    return ModelList(models=[model_card(await service.describe_model())])


@router.get(
    "/v1/models/{model_id}",
    response_model=ModelCard,
    dependencies=[ClientAccess],
    responses=error_responses(401, 404, 503),
)
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    """One model by id (``name@weights-hash``) or by name."""
    return model_card(await service.describe_model(model_id))


def model_card(described: ModelDescription) -> ModelCard:
    info = described.info
    return ModelCard.model_validate(
        {
            **info.to_dict(),
            "id": info.model_id,
            "options": described.options.to_dict(),
            "default_profile": described.default_profile,
            "profiles": [p.summary() for p in described.profiles],
            "refused_profiles": [{"name": r.name, "reason": r.reason} for r in described.refused_profiles],
        }
    )


@router.post(
    "/v1/profiles",
    status_code=201,
    response_model=ProfileSummary,
    dependencies=[AdminAccess, Admission],
    responses=error_responses(400, 401, 403, 409, 413, 415, 422, 500, 503, 504),
    openapi_extra=request_body(ProfileRequest, PROFILE_FORM_FIELDS, ["name"], raw_image=False),
    summary="Create a calibration profile from normal images (admin)",
)
async def create_profile(
    request: Request, service: ServiceDep, settings: SettingsDep, deadline: RequestDeadline
) -> ProfileSummary:
    """Fit a calibration profile for a new domain from 10 or more of its normal images. The images go
    through the same queue as scoring; the profile is saved under the model's profiles folder and is usable
    by the next request. Needs an admin key (DDM_ADMIN_API_KEYS; scoring keys get 403), or
    DDM_ALLOW_OPEN_PROFILE_CREATION when no keys are set: such anonymous uploads get the scoring body cap
    and must arrive within the request deadline. At most DDM_PROFILE_CREATIONS at a time (503 beyond)."""
    async with _creation_slot(request, settings):
        return await _create_profile(request, service, settings, deadline)


@asynccontextmanager
async def _creation_slot(request: Request, settings: Settings) -> AsyncIterator[None]:
    """Refuse, before its body is read, a creation beyond DDM_PROFILE_CREATIONS: each holds its whole
    upload in memory until its profile is fitted."""
    state = request.app.state
    running = getattr(state, "profile_creations", 0)
    if running >= settings.profile_creations:
        raise Overloaded("another profile is being created; try again later", retry_after_s=5.0)
    state.profile_creations = running + 1
    try:
        yield
    finally:
        state.profile_creations -= 1


async def _create_profile(
    request: Request, service: ScoringService, settings: Settings, deadline: Deadline
) -> ProfileSummary:
    reading = read_upload(request, ProfileRequest, settings.max_profile_images)
    # anonymous uploads (open creation) must arrive within the request deadline; an admin's may take longer
    upload = await (deadline.read(reading) if open_profile_creation(settings) else reading)
    if isinstance(upload.body, ProfileRequest):
        body = upload.body
        options: dict[str, Any] = {
            "fprs": body.fprs or DEFAULT_FPRS,
            "default_fpr": body.default_fpr,
            "overwrite": body.overwrite,
            "source": body.source,
            "aggregation": body.aggregation,
        }
        name = body.name
    else:
        name, options = _form_options(upload.fields)
    if options["overwrite"] and not settings.admin_api_keys:
        raise Unauthorized("overwriting a profile needs an admin key (DDM_ADMIN_API_KEYS)", forbidden=True)
    profile = await until_disconnected(request, service.create_profile(name, upload.images, **options))
    return ProfileSummary.model_validate(profile.summary())


@router.delete(
    "/v1/profiles/{name}",
    status_code=204,
    dependencies=[AdminKeyAccess],
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Delete a calibration profile (admin)",
)
async def delete_profile(
    name: Annotated[str, Path(min_length=1, max_length=PROFILE_NAME_MAX, pattern=PROFILE_NAME_PATTERN)],
    service: ServiceDep,
) -> Response:
    """Remove a profile from the model's profiles folder; always needs an admin key. The service's default
    profile cannot be deleted (409)."""
    await service.delete_profile(name)
    return Response(status_code=204)


def _form_options(fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
    name = fields.get("name")
    if not name:
        raise InvalidInput("form field 'name' is required")
    fprs_text = fields.get("fprs")
    if fprs_text is not None and (
        len(fprs_text) > FPRS_FIELD_MAX or not re.match(FPRS_FIELD_PATTERN, fprs_text)
    ):
        raise InvalidInput("form field 'fprs' must be comma-separated numbers, e.g. 0.01,0.05")
    try:
        fprs = tuple(float(f) for f in fprs_text.split(",") if f.strip()) if fprs_text is not None else None
        default_fpr = float(fields.get("default_fpr", "0.05"))
    except ValueError:
        raise InvalidInput("fprs and default_fpr must be numbers") from None
    if fprs is not None and len(fprs) > MAX_FPRS - 1:
        raise InvalidInput(f"form field 'fprs' lists {len(fprs)} rates; at most {MAX_FPRS - 1}")
    source = fields.get("source", "")
    if len(source) > SOURCE_MAX:
        raise InvalidInput(f"form field 'source' is over {SOURCE_MAX} characters")
    aggregation = fields.get("aggregation")
    if aggregation is not None and aggregation not in PROFILE_AGGREGATIONS:
        raise InvalidInput(f"form field 'aggregation' must be one of {', '.join(PROFILE_AGGREGATIONS)}")
    options = {
        "fprs": fprs or DEFAULT_FPRS,
        "default_fpr": default_fpr,
        "overwrite": bool(form_flag(fields, "overwrite")),
        "source": source,
        "aggregation": aggregation,
    }
    return name, options
