"""The protocol's JSON schema (request, response, metadata) and this model's tensor names and types."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.web.schemas import EXAMPLE_PNG_B64

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
Parameter = str | int | float | bool
MAX_PARAMETERS = 32  # entries of one parameters object (the service reads four)


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


# Requests are validated strictly: JSON types as the protocol states them ("shape": ["1"] or
# "binary_data": "false" are refused, never coerced).
class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=200)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Parameter] | None = Field(None, max_length=MAX_PARAMETERS)
    data: list[Any] | None = Field(
        None, description="BYTES elements as base64 strings (row-major; nested lists are flattened)"
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=200)
    parameters: dict[str, Parameter] | None = Field(None, max_length=MAX_PARAMETERS)


class InferRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
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
    parameters: dict[str, Parameter] | None = Field(None, max_length=MAX_PARAMETERS)
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
