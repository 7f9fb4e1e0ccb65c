"""OpenAPI request bodies for routes that parse their own body (to cap it while it streams)."""

from __future__ import annotations

from typing import Any

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
