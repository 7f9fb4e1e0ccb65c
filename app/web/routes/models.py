"""``GET /v1/models[/{id}]`` (model metadata and its profiles) and ``POST /v1/profiles`` (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from app.engine.calibration import DEFAULT_FPRS
from app.errors import InvalidInput
from app.web.deps import AdminAccess, Admission, ClientAccess, ServiceDep, SettingsDep
from app.web.errors import ERROR_RESPONSES
from app.web.openapi import request_body
from app.web.schemas import ModelCard, ModelList, ProfileRequest, ProfileSummary
from app.web.uploads import form_flag, read_upload, until_disconnected

router = APIRouter(tags=["models"])

PROFILE_FORM_FIELDS = {
    "name": {"type": "string", "description": "profile name: letters, digits, '_' '-', one '.suffix'"},
    "fprs": {"type": "string", "description": "comma-separated false-positive rates, e.g. 0.01,0.05"},
    "default_fpr": {"type": "number", "description": "the rate whose threshold decides (default 0.05)"},
    "overwrite": {"type": "boolean", "description": "replace a profile of the same name"},
    "source": {"type": "string", "description": "free text: where the images came from"},
}


@router.get("/v1/models", response_model=ModelList, dependencies=[ClientAccess], responses=ERROR_RESPONSES)
async def list_models(service: ServiceDep) -> ModelList:
    """The loaded base model with its method options and calibration profiles."""
    card = await run_in_threadpool(service.describe_model)  # reads the profile files
    return ModelList(models=[ModelCard.model_validate(card)])


@router.get(
    "/v1/models/{model_id}", response_model=ModelCard, dependencies=[ClientAccess], responses=ERROR_RESPONSES
)
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    """One model by id (``name@weights-hash``) or by name."""
    return ModelCard.model_validate(await run_in_threadpool(service.describe_model, model_id))


@router.post(
    "/v1/profiles",
    status_code=201,
    response_model=ProfileSummary,
    dependencies=[AdminAccess, Admission],
    responses=ERROR_RESPONSES,
    openapi_extra=request_body(ProfileRequest, PROFILE_FORM_FIELDS, ["name"], raw_image=False),
    summary="Create a calibration profile from normal images (admin)",
)
async def create_profile(request: Request, service: ServiceDep, settings: SettingsDep) -> ProfileSummary:
    """Fit a calibration profile for a new domain from 10 or more of its normal images. The images go
    through the same queue as scoring; the profile is saved under the model's profiles folder and is usable
    by the next request. Needs an API key (or DDM_ALLOW_OPEN_PROFILE_CREATION when no keys are set)."""
    upload = await read_upload(request, ProfileRequest, settings.max_profile_images)
    if isinstance(upload.body, ProfileRequest):
        body = upload.body
        options: dict[str, Any] = {
            "fprs": body.fprs or DEFAULT_FPRS,
            "default_fpr": body.default_fpr,
            "overwrite": body.overwrite,
            "source": body.source,
        }
        name = body.name
    else:
        name, options = _form_options(upload.fields)
    profile = await until_disconnected(request, service.create_profile(name, upload.images, **options))
    return ProfileSummary.model_validate(profile.summary())


def _form_options(fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
    name = fields.get("name")
    if not name:
        raise InvalidInput("form field 'name' is required")
    try:
        fprs = tuple(float(f) for f in fields["fprs"].split(",") if f.strip()) if "fprs" in fields else None
        default_fpr = float(fields.get("default_fpr", "0.05"))
    except ValueError:
        raise InvalidInput("fprs and default_fpr must be numbers") from None
    options = {
        "fprs": fprs or DEFAULT_FPRS,
        "default_fpr": default_fpr,
        "overwrite": bool(form_flag(fields, "overwrite")),
        "source": fields.get("source", "")[:500],
    }
    return name, options
