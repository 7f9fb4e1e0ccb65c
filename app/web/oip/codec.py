"""Tensors in and out: the JSON form (BYTES as base64) and the binary tensor extension (a JSON header of
``Inference-Header-Content-Length`` bytes, then raw tensors; BYTES elements as a 4-byte little-endian
length + bytes each).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app.errors import InvalidInput, PayloadTooLarge
from app.service.results import ScoreOutcome
from app.web.oip.wire import (
    HEATMAP,
    INPUT_NAME,
    OUTPUTS,
    InferRequest,
    InferResponse,
    Parameter,
    ResponseOutput,
)
from app.web.uploads import bound_json_values, decode_base64

# JSON values a request may hold besides its images' (a few per image: the string and its separator): the
# tensor descriptions, outputs and parameters of any real request fit many times over.
JSON_VALUES_BASE = 256
FLAGS = ("explain", "binary_data_output")  # request parameters that must be JSON booleans


# --- request parsing --------------------------------------------------------------------------------------
def parse_request(
    body: bytearray, header_length: str | None, max_images: int
) -> tuple[InferRequest, bytearray]:
    """The JSON request and the binary part after it (empty without the binary tensor extension). The
    JSON is bounded before it is parsed (``bound_json_values``), as /v1 counts its images first; ``body``
    is emptied once parsed (the request holds only what it still needs)."""
    try:
        return _parse(body, header_length, max_images)
    finally:
        body.clear()


def _parse(body: bytearray, header_length: str | None, max_images: int) -> tuple[InferRequest, bytearray]:
    if header_length is None:
        json_part, binary = body, bytearray()
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 < length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {length} does not fit the {len(body)}-byte body"
            )
        with memoryview(body) as view:  # one copy of the binary part, none of the whole body
            json_part, binary = bytearray(view[:length]), bytearray(view[length:])
    bound_json_values(json_part, JSON_VALUES_BASE + 4 * max_images)
    try:
        return InferRequest.model_validate_json(json_part), binary
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def check_flags(req: InferRequest, params: dict[str, Parameter]) -> None:
    """Boolean parameters must be JSON booleans: ``"false"`` is truthy and would silently mean true."""
    flags = [(f"parameter {name!r}", params.get(name)) for name in FLAGS]
    for out in req.outputs or []:
        flags.append(
            (f"output {out.name!r} parameter 'binary_data'", (out.parameters or {}).get("binary_data"))
        )
    for where, value in flags:
        if value is not None and not isinstance(value, bool):
            raise InvalidInput(f"{where} must be true or false (a JSON boolean), not {value!r}"[:200])


def wanted_outputs(req: InferRequest, params: dict[str, Parameter]) -> list[str]:
    check_flags(req, params)
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


def read_infer(
    body: bytearray, header_length: str | None, max_images: int
) -> tuple[InferRequest, list[str], list[tuple[str, bytes]]]:
    """The request, the outputs it wants and its images, in one step: the body is emptied once parsed and
    the base64 text dropped once decoded, so only the decoded bytes are kept while the request waits for
    the model (docs/RELIABILITY.md#memory-per-request)."""
    req, binary = parse_request(body, header_length, max_images)
    wanted = wanted_outputs(req, req.parameters or {})
    images = request_images(req, binary, max_images)
    req.inputs[0].data = None
    return req, wanted, images


def request_images(req: InferRequest, binary: bytearray, max_images: int) -> list[tuple[str, bytes]]:
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


def _split_bytes(raw: bytearray, count: int) -> list[bytes]:
    """The binary tensor extension's BYTES layout: per element a 4-byte little-endian length, then bytes."""
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput("binary BYTES data ends before its shape's element count")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInput("a binary BYTES element runs past the end of the body")
        with memoryview(raw) as view:
            out.append(bytes(view[offset : offset + n]))
        offset += n
    if offset != len(raw):
        raise InvalidInput("binary BYTES data is longer than its shape")
    return out


# --- response encoding ------------------------------------------------------------------------------------
def encode_response(
    response: InferResponse,
    outcome: ScoreOutcome,
    infer_request: InferRequest,
    wanted: list[str],
    params: dict[str, Parameter],
) -> Response:
    """The ``wanted`` outputs of ``outcome``, each in JSON or binary as the request asked (the request
    parameter ``binary_data_output``, or an output's own ``binary_data``)."""
    binary_out = bool(params.get("binary_data_output", False))
    requested = {o.name: o for o in infer_request.outputs or []}
    outputs = []
    for out_name in wanted:
        as_binary = binary_out
        if out_name in requested and requested[out_name].parameters:
            as_binary = bool(requested[out_name].parameters.get("binary_data", as_binary))  # type: ignore[union-attr]
        outputs.append(_output(out_name, outcome, as_binary))
    return _encode(response, outputs)


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
