"""OpenAPI request bodies for routes that parse their own body (to cap it while it streams)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from app.web.uploads import RAW_IMAGE_TYPES


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` references inlined (usable inside ``openapi_extra``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def request_body(
    json_model: type[BaseModel], form_fields: dict[str, dict[str, Any]], required: list[str], raw_image: bool
) -> dict[str, Any]:
    """``openapi_extra`` for a body that is multipart (``files`` parts), JSON, or (optionally) one image."""
    form = {
        "type": "object",
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "the images, one part each (the file name becomes the result id)"},
            **form_fields,
        },
        "required": ["files", *required],
    }  # fmt: skip
    content: dict[str, Any] = {
        "application/json": {"schema": inline_schema(json_model)},
        "multipart/form-data": {"schema": form},
    }
    if raw_image:
        for kind in RAW_IMAGE_TYPES:
            content[kind] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def publish_limits(app: FastAPI, image_caps: dict[str, int], min_timeout_s: float) -> None:
    """Write the deployment's limits (settings) into the served schema, so the schema refuses what the
    handler refuses: ``maxItems`` of the JSON ``images`` list and the multipart ``files`` parts
    (``image_caps``: path -> the most images one request may carry), and the minimum of ``timeout_s``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, cap in image_caps.items():
            content = schema["paths"][path]["post"]["requestBody"]["content"]
            content["application/json"]["schema"]["properties"]["images"]["maxItems"] = cap
            content["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] = cap
            content["multipart/form-data"]["schema"]["properties"]["files"]["minItems"] = 1
        for parameter in schema["paths"]["/v1/score"]["post"]["parameters"]:
            if parameter["name"] == "timeout_s":
                for option in parameter["schema"].get("anyOf", [parameter["schema"]]):
                    if option.get("type") == "number":
                        option.pop("exclusiveMinimum", None)
                        option["minimum"] = min_timeout_s
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
