"""Open Inference Protocol v2 (KServe V2 / Triton) REST: server and model metadata, model readiness and
``POST /v2/models/{name}/infer``.

The model takes one BYTES input, ``images``, shape ``[N]``: each element is one encoded image file (PNG,
JPEG, ...), base64 in the JSON body as the protocol's JSON form requires of binary BYTES, or raw in the
binary tensor extension (``Inference-Header-Content-Length``; what tritonclient sends by default). It answers
``score``, ``threshold``, ``percentile``, ``p_value`` (FP64), ``is_anomaly`` (BOOL) and, when asked for,
``heatmap`` (BYTES: a PNG per image), each of shape ``[N]``. Request parameters: ``profile`` (the
calibration profile), ``explain`` (add ``heatmap``) and ``timeout`` (microseconds, Triton's name).

Scoring goes through ``ScoringService.score``: the same admission, API keys, caps, queue, deadline,
metrics and error table as ``/v1/score``; ``OipErrors`` rewrites error bodies on ``/v2`` paths to the
protocol's ``{"error": "<message>"}`` (the request id stays in the ``x-request-id`` header).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.errors import DeadlineExceeded, InvalidInput, ModelNotFound, PayloadTooLarge
from app.service.scoring import ScoreOutcome, ScoringService
from app.web.deps import Admission, ClientAccess, ServiceDep, SettingsDep
from app.web.errors import error_responses
from app.web.openapi import inline_schema
from app.web.schemas import EXAMPLE_PNG_B64
from app.web.uploads import decode_base64, until_disconnected

router = APIRouter(tags=["open inference protocol v2"])

SERVER_NAME = "ddm-anomaly"
EXTENSIONS = ["binary_tensor_data"]
INPUT_NAME = "images"
HEADER_LENGTH = "inference-header-content-length"
# output name (a Verdict attribute) -> datatype; "heatmap" is computed only when requested
OUTPUTS: dict[str, str] = {
    "score": "FP64",
    "threshold": "FP64",
    "is_anomaly": "BOOL",
    "percentile": "FP64",
    "p_value": "FP64",
}
HEATMAP = "heatmap"
ModelName = Annotated[str, Path(max_length=200, description="the model's name (or its id name@hash)")]
Parameter = str | int | float | bool


# --- wire models (the protocol's JSON schema) -------------------------------------------------------------
class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = Field(
        None, description="BYTES elements as base64 strings (row-major; nested lists are flattened)"
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200)
    parameters: dict[str, Parameter] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "req-1",
                    "parameters": {"profile": "default"},
                    "inputs": [
                        {"name": INPUT_NAME, "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_PNG_B64]}
                    ],
                }
            ]
        },
    )

    id: str | None = Field(None, max_length=200)
    parameters: dict[str, Parameter] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=4)
    outputs: list[RequestOutput] | None = Field(None, max_length=len(OUTPUTS) + 1)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    outputs: list[ResponseOutput]


class OipError(BaseModel):
    error: str = Field(examples=["no calibration profile 'x' for model celeba32-ref@ecaff7b26f72"])


def oip_errors(*statuses: int) -> dict[int | str, dict]:
    return {s: {**r, "model": OipError} for s, r in error_responses(*statuses).items()}


# --- routes -----------------------------------------------------------------------------------------------
@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def _model(service: ScoringService, name: str, version: str | None = None) -> tuple[str, str]:
    """(name, version) of the loaded model if ``name`` (and ``version``) name it; else ModelNotFound."""
    if not service.engine.ready:
        service.admit()  # raises: loading or failed
    info = service.engine.info
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
    card = await asyncio.to_thread(service.describe_model)  # reads the profile files
    profiles = ",".join(p["name"] for p in card["profiles"])
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
            "method": card["options"].get("method", ""),
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
    model_version: str | None = None,
) -> Response:
    """One BYTES tensor of encoded images in, per-image score, threshold, is_anomaly, percentile and
    p_value out (``heatmap`` too when listed in ``outputs`` or with the parameter ``explain``)."""
    name, version = _model(service, model_name, model_version)
    received = request.scope["state"].get("received_at", time.monotonic())
    deadline = received + settings.request_timeout_s
    body = await _read_body(request, deadline)
    header_length = request.headers.get(HEADER_LENGTH)
    infer_request, binary = await asyncio.to_thread(_parse, body, header_length)
    params = infer_request.parameters or {}
    profile = params.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise InvalidInput("parameter 'profile' must be a string")
    timeout_us = params.get("timeout")
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float) or timeout_us <= 0:
            raise InvalidInput("parameter 'timeout' must be a positive number of microseconds")
        if timeout_us / 1e6 < settings.min_request_timeout_s:
            raise InvalidInput(f"parameter 'timeout' must be at least {settings.min_request_timeout_s:g} s")
        deadline = min(deadline, received + timeout_us / 1e6)
    wanted = _wanted_outputs(infer_request, params)
    images = _images(infer_request, binary, settings.max_images_per_request)
    outcome = await until_disconnected(
        request, service.score(images, profile=profile, explain=HEATMAP in wanted, deadline=deadline)
    )
    binary_out = bool(params.get("binary_data_output", False))
    requested = {o.name: o for o in infer_request.outputs or []}
    outputs = []
    for out_name in wanted:
        as_binary = binary_out
        if out_name in requested and requested[out_name].parameters:
            as_binary = bool(requested[out_name].parameters.get("binary_data", as_binary))  # type: ignore[union-attr]
        outputs.append(_output(out_name, outcome, as_binary))
    response = InferResponse(model_name=name, model_version=version, id=infer_request.id, outputs=[])
    return _encode(response, outputs)


# --- request parsing --------------------------------------------------------------------------------------
async def _read_body(request: Request, deadline: float) -> bytes:
    async def read() -> bytes:
        return b"".join([chunk async for chunk in request.stream()])

    try:
        return await asyncio.wait_for(read(), max(0.0, deadline - time.monotonic()))
    except TimeoutError as exc:
        if isinstance(exc, DeadlineExceeded):
            raise
        raise DeadlineExceeded("the request body did not arrive before the request deadline") from None


def _parse(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary part after it (empty without the binary tensor extension)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 < length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {length} does not fit the {len(body)}-byte body"
            )
        json_part, binary = body[:length], body[length:]
    try:
        return InferRequest.model_validate_json(json_part), binary
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def _wanted_outputs(req: InferRequest, params: dict[str, Parameter]) -> list[str]:
    known = [*OUTPUTS, HEATMAP]
    if not req.outputs:
        return [*OUTPUTS, HEATMAP] if params.get("explain") is True else list(OUTPUTS)
    names = [o.name for o in req.outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; this model has {known}")
    if len(set(names)) != len(names):
        raise InvalidInput("an output is requested twice")
    return names


def _images(req: InferRequest, binary: bytes, max_images: int) -> list[tuple[str, bytes]]:
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT_NAME:
        raise InvalidInput(f"expected one input named {INPUT_NAME!r} (BYTES, shape [N]: encoded images)")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {INPUT_NAME!r} must be BYTES (encoded image files), not {tensor.datatype}")
    if any(d < 0 for d in tensor.shape) or not tensor.shape:
        raise InvalidInput(f"input shape {tensor.shape} is not a list of non-negative sizes")
    count = math.prod(tensor.shape)
    if count > max_images:
        raise PayloadTooLarge(f"{count} images in one request; at most {max_images}")
    if count == 0:
        raise InvalidInput("no images in the request")
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInput("an input has both 'data' and 'binary_data_size'")
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise InvalidInput(
                f"binary_data_size {size} does not match the {len(binary)} bytes after the header"
            )
        elements = _split_bytes(binary, count)
    else:
        if tensor.data is None:
            raise InvalidInput(f"input {INPUT_NAME!r} has no data")
        if binary:
            raise InvalidInput("binary data after the header but no input declares binary_data_size")
        flat = _flatten(tensor.data, count)
        elements = [decode_base64(text, str(i)) for i, text in enumerate(flat)]
    return [(str(i), data) for i, data in enumerate(elements)]


def _flatten(data: list[Any], count: int) -> list[str]:
    flat: list[str] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 8:
                    raise InvalidInput("input data is nested deeper than its shape")
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidInput("BYTES elements must be base64 strings")
            flat.append(item)
            if len(flat) > count:
                break
        else:
            stack.pop()
            continue
        if len(flat) > count:
            break
    if len(flat) != count:
        raise InvalidInput(f"input data does not match its shape: expected {count} elements")
    return flat


def _split_bytes(raw: bytes, count: int) -> list[bytes]:
    """The binary tensor extension's BYTES layout: per element a 4-byte little-endian length, then bytes."""
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput("binary BYTES data ends before its shape's element count")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInput("a binary BYTES element runs past the end of the body")
        out.append(raw[offset : offset + n])
        offset += n
    if offset != len(raw):
        raise InvalidInput("binary BYTES data is longer than its shape")
    return out


# --- response encoding ------------------------------------------------------------------------------------
def _output(name: str, outcome: ScoreOutcome, binary: bool) -> tuple[ResponseOutput, bytes | None]:
    n = len(outcome.results)
    if name == HEATMAP:
        pngs = [r.heatmap_png or b"" for r in outcome.results]
        tensor = ResponseOutput(name=name, shape=[n], datatype="BYTES")
        if binary:
            raw = b"".join(struct.pack("<I", len(p)) + p for p in pngs)
            return _binary(tensor, raw)
        tensor.data = [base64.b64encode(p).decode() for p in pngs]
        return tensor, None
    datatype = OUTPUTS[name]
    values = [getattr(r.verdict, name) for r in outcome.results]
    tensor = ResponseOutput(name=name, shape=[n], datatype=datatype)
    if binary:
        if datatype == "BOOL":
            return _binary(tensor, np.asarray(values, dtype=np.bool_).tobytes())
        floats = [math.nan if v is None else float(v) for v in values]
        return _binary(tensor, np.asarray(floats, dtype="<f8").tobytes())
    if datatype == "BOOL":
        tensor.data = [bool(v) for v in values]
    else:  # JSON has no NaN: a score that was not finite travels as null, as in /v1/score
        tensor.data = [float(v) if v is not None and math.isfinite(v) else None for v in values]
    return tensor, None


def _binary(tensor: ResponseOutput, raw: bytes) -> tuple[ResponseOutput, bytes]:
    tensor.parameters = {"binary_data_size": len(raw)}
    return tensor, raw


def _encode(response: InferResponse, outputs: list[tuple[ResponseOutput, bytes | None]]) -> Response:
    response.outputs = [t for t, _ in outputs]
    blobs = [raw for _, raw in outputs if raw is not None]
    content = response.model_dump(exclude_none=True)
    if not blobs:
        return JSONResponse(content)
    header = json.dumps(content, separators=(",", ":")).encode()
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# --- error bodies in the protocol's shape -----------------------------------------------------------------
def is_oip_path(path: str) -> bool:
    return path == "/v2" or (path.startswith("/v2/") and not path.startswith("/v2/health/"))


class OipErrors:
    """On ``/v2`` paths, rewrite the service's error body ``{"error": {"code", "message", "request_id"}}``
    to the protocol's ``{"error": "<message>"}``; status, headers (Retry-After, x-request-id), metrics and
    logs stay those of the shared error handlers. Outermost middleware: it also sees the byte-cap 413."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_oip_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _oip_error_body(b"".join(chunks))
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def _oip_error_body(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message = error.get("message") or error.get("code") or "error"
        return json.dumps({"error": str(message)}).encode()
    return body
