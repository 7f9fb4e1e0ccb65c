"""Open Inference Protocol v2 (KServe V2 / Triton) REST: server and model metadata, model readiness and
``POST /v2/models/{name}/infer``.

The model takes one BYTES input, ``images``, shape ``[N]``: each element is one encoded image file (PNG,
JPEG, ...), base64 in the JSON body as the protocol's JSON form requires of binary BYTES, or raw in the
binary tensor extension (``Inference-Header-Content-Length``; what tritonclient sends by default). It answers
``score``, ``threshold``, ``percentile``, ``p_value`` (FP64), ``is_anomaly`` (BOOL) and, when asked for,
``heatmap`` (BYTES: a PNG per image), each of shape ``[N]``. Request parameters: ``profile`` (the
calibration profile), ``explain`` (add ``heatmap``) and ``timeout`` (microseconds, Triton's name).

Scoring goes through ``ScoringService.score``: the same admission, API keys, caps, queue, deadline,
metrics and error table as ``/v1/score``; ``app.web.oip.errors.OipErrors`` rewrites error bodies on
``/v2`` paths to the protocol's ``{"error": "<message>"}`` (the request id stays in the ``x-request-id``
header). The wire schema and the tensor codec are in ``app.web.oip``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from app import __version__
from app.errors import InvalidInput, ModelNotFound, ModelNotReady
from app.service.scoring import ScoringService
from app.web.deadline import Deadline, RequestDeadline, TimeoutTooShort
from app.web.deps import Admission, ClientAccess, ServiceDep, SettingsDep
from app.web.oip.codec import encode_response, read_infer
from app.web.oip.errors import oip_errors
from app.web.oip.wire import (
    EXTENSIONS,
    HEADER_LENGTH,
    HEATMAP,
    INPUT_NAME,
    OUTPUTS,
    SERVER_NAME,
    InferRequest,
    InferResponse,
    MetadataTensor,
    ModelMetadata,
    ModelReady,
    Parameter,
    ServerMetadata,
)
from app.web.openapi import inline_schema
from app.web.uploads import parse_slot, read_body, until_disconnected

router = APIRouter(tags=["open inference protocol v2"])

ModelName = Annotated[str, Path(max_length=200, description="the model's name (or its id name@hash)")]


# --- routes -----------------------------------------------------------------------------------------------
@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def _model(service: ScoringService, name: str, version: str | None = None) -> tuple[str, str]:
    """(name, version) of the loaded model if ``name`` (and ``version``) name it; else ModelNotFound."""
    info = service.model_info().info
    if info is None:
        service.admit()  # raises: loading, failed or draining
        raise ModelNotReady("the model is not loaded")
    model_version = info.model_id.rpartition("@")[2]
    if name not in (info.name, info.model_id) or version not in (None, model_version):
        shown = f"{name} version {version}" if version else name
        raise ModelNotFound(f"no model {shown!r}; this service runs {info.name} version {model_version}")
    return info.name, model_version


@router.get(
    "/v2/models/{model_name}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
    dependencies=[ClientAccess],
    responses=oip_errors(401, 404, 422, 503),
)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
    dependencies=[ClientAccess],
    responses=oip_errors(401, 404, 422, 503),
    include_in_schema=False,
)
async def model_metadata(
    model_name: ModelName, service: ServiceDep, settings: SettingsDep, model_version: str | None = None
) -> ModelMetadata:
    """Model metadata: the one BYTES input of encoded images and the per-image outputs. ``parameters``
    name the default calibration profile and the profiles on disk (choose one per request with the
    request parameter ``profile``)."""
    name, version = _model(service, model_name, model_version)
    described = await service.describe_model()
    profiles = ",".join(p.name for p in described.profiles)
    outputs = [MetadataTensor(name=n, datatype=t, shape=[-1]) for n, t in OUTPUTS.items()]
    outputs.append(MetadataTensor(name=HEATMAP, datatype="BYTES", shape=[-1]))
    return ModelMetadata(
        name=name,
        versions=[version],
        platform="pytorch_diffusers",
        inputs=[MetadataTensor(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=outputs,
        parameters={
            "profile": settings.default_profile,
            "profiles": profiles,
            "method": described.options.method,
            "max_images_per_request": settings.max_images_per_request,
        },
    )


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=oip_errors(404, 422, 503))
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=oip_errors(404, 422, 503),
    include_in_schema=False,
)
async def model_ready(
    model_name: ModelName, service: ServiceDep, model_version: str | None = None
) -> ModelReady:
    """200 when the model is loaded, warmed up and taking work; 503 while loading or draining."""
    name, _ = _model(service, model_name, model_version)
    service.admit()
    return ModelReady(name=name, ready=True)


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferResponse,
    dependencies=[ClientAccess, Admission],
    responses={
        200: {
            "description": "JSON, or with the binary tensor extension (binary_data_output) a JSON header of "
            "Inference-Header-Content-Length bytes followed by the binary outputs",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **oip_errors(400, 401, 404, 409, 413, 415, 422, 500, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(InferRequest)},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "binary tensor extension: JSON header of Inference-Header-Content-Length "
                    "bytes, then each binary input (BYTES: 4-byte little-endian length + bytes per element)",
                },
            },
        }
    },
    summary="Score images (Open Inference Protocol v2)",
)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    dependencies=[ClientAccess, Admission],
    include_in_schema=False,
)
async def infer(
    request: Request,
    model_name: ModelName,
    service: ServiceDep,
    settings: SettingsDep,
    deadline: RequestDeadline,
    model_version: str | None = None,
) -> Response:
    """One BYTES tensor of encoded images in, per-image score, threshold, is_anomaly, percentile and
    p_value out (``heatmap`` too when listed in ``outputs`` or with the parameter ``explain``)."""
    name, version = _model(service, model_name, model_version)
    body = await deadline.read(read_body(request))
    header_length = request.headers.get(HEADER_LENGTH)
    async with parse_slot(request):
        infer_request, wanted, images = await asyncio.to_thread(
            read_infer, body, header_length, settings.max_images_per_request
        )
    params = infer_request.parameters or {}
    profile = params.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise InvalidInput("parameter 'profile' must be a string")
    deadline = _requested_deadline(params, deadline)
    outcome = await until_disconnected(
        request, service.score(images, profile=profile, explain=HEATMAP in wanted, deadline=deadline.at)
    )
    response = InferResponse(model_name=name, model_version=version, id=infer_request.id, outputs=[])
    return encode_response(response, outcome, infer_request, wanted, params)


def _requested_deadline(params: dict[str, Parameter], deadline: Deadline) -> Deadline:
    """``deadline``, shortened by the request parameter ``timeout`` (microseconds, Triton's name)."""
    timeout_us = params.get("timeout")
    if timeout_us is None:
        return deadline
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float) or timeout_us <= 0:
        raise InvalidInput("parameter 'timeout' must be a positive number of microseconds")
    try:
        return deadline.shortened(timeout_us / 1e6)
    except TimeoutTooShort as exc:
        raise InvalidInput(f"parameter 'timeout' must be at least {exc} s") from None
