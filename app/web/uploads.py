"""Request bodies -> (id, encoded image bytes) lists plus options, for multipart, JSON and raw image bodies.

The byte cap is enforced underneath (RequestContext wraps ``receive``); here the number of parts is capped
while parsing, base64 is checked, and JSON is validated off the event loop. ``until_disconnected`` runs
the work and cancels it if the client goes away (its queued images then never reach the model).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from app.web.errors import ClientGone
from app.web.schemas import ImageIn

M = TypeVar("M", bound=BaseModel)
V = TypeVar("V")

MAX_FORM_FIELDS = 16
# JSON bodies parsed (and their base64 decoded) at a time: parsing holds a body three times over (its
# bytes, the parsed strings, the decoded images), so concurrent bodies wait their turn here instead
# (docs/RELIABILITY.md#memory-per-request)
JSON_PARSERS = 1
_JSON = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff")


@dataclass
class Upload:
    images: list[tuple[str, bytes]]
    fields: dict[str, str] = field(default_factory=dict)  # multipart form fields (options)
    body: BaseModel | None = None  # the validated JSON body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_upload(request: Request, json_model: type[M], max_images: int) -> Upload:
    """Parse the body by content type: multipart ``files`` parts, JSON ``images``, or one raw image."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await _read_multipart(request, max_images)
    if kind == "application/json":
        raw = await read_body(request)
        async with parse_slot(request):
            return await asyncio.to_thread(_parse_json_upload, json_model, raw, max_images)
    if kind in RAW_IMAGE_TYPES:
        data = b"".join([chunk async for chunk in request.stream()])
        return Upload([("0", data)])
    raise UnsupportedMediaType(
        f"content type {kind or '(none)'!r} not accepted: send multipart/form-data with 'files' parts, "
        "application/json with base64 'images', or one image as image/png|jpeg|..."
    )


async def read_body(request: Request) -> bytearray:
    """The whole body, grown in place: no list of chunks beside the joined copy. Under a deadline:
    ``Deadline.read`` (app/web/deadline.py)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def _read_multipart(request: Request, max_images: int) -> Upload:
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=max_images, max_fields=MAX_FORM_FIELDS
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        error = PayloadTooLarge if exc.message.startswith("Too many") else InvalidInput
        raise error(f"multipart body: {exc.message}") from None
    try:
        images: list[tuple[str, bytes]] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("files", "file"):
                    raise InvalidInput(f"unexpected file part {key!r}; send images as 'files' parts")
                image_id = (value.filename or "")[:200] or str(len(images))
                images.append((image_id, await value.read()))
            elif key in ("files", "file"):
                raise InvalidInput("a 'files' part must be a file upload (with a filename)")
            else:
                fields[key] = value
        return Upload(images, fields=fields)
    finally:
        await form.close()


def parse_slot(request: Request) -> asyncio.Semaphore:
    """The app's bound on JSON bodies parsed at a time (JSON_PARSERS)."""
    state = request.app.state
    if getattr(state, "json_parsers", None) is None:
        state.json_parsers = asyncio.Semaphore(JSON_PARSERS)
    slot: asyncio.Semaphore = state.json_parsers
    return slot


def _parse_json_upload(model: type[M], raw: bytearray, max_images: int) -> Upload:
    """Validate, then decode the base64 images. Each form is dropped once the next exists: the body is
    emptied once parsed, the base64 text (a third more than the images) once decoded, so a request holds
    only the decoded bytes while it waits for the model (docs/RELIABILITY.md#memory-per-request)."""
    count_json_images(raw, max_images)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    finally:
        raw.clear()
    images = getattr(body, "images", [])
    if len(images) > max_images:  # the early count gives up on bodies it cannot read; this never does
        raise PayloadTooLarge(f"{len(images)} images in one request; at most {max_images}")
    body = body.model_copy(update={"images": []})
    return Upload(_decode_images(images), body=body)


def count_json_images(body: bytes | bytearray, max_images: int) -> None:
    """Raise PayloadTooLarge as soon as a top-level ``images`` array holds more than ``max_images`` entries.

    Runs before validation, which would build every entry (and an error per bad entry) first: a 5 MiB body
    of 1.6M empty objects costs pydantic 9 s and 1.3 GB. Here the stdlib's C scanner decodes one value at
    a time and stops at entry ``max_images + 1``. Anything that is not a JSON object is left to the
    validator to refuse with its usual message.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return
    decoder = _JSON
    ws = _WHITESPACE
    try:
        i = ws.match(text, 0).end()  # type: ignore[union-attr]
        if text[i : i + 1] != "{":
            return
        i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
        while text[i : i + 1] == '"':
            key, i = decoder.raw_decode(text, i)
            i = ws.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ":":
                return
            i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
            if key == "images" and text[i : i + 1] == "[":
                i = _count_array(text, i, max_images)
            else:
                _, i = decoder.raw_decode(text, i)
            i = ws.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ",":
                return
            i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
    except PayloadTooLarge:
        raise
    except (ValueError, _Malformed, RecursionError):
        # malformed (JSONDecodeError), an integer over Python's digit limit, or nested too deep for the
        # stdlib: the validator says what is wrong
        return


# A JSON string (skipped whole, in C) or a token that adds a value: ',' separates values, '[' and '{' open
# containers. Counting them bounds how many Python objects parsing the document can create.
_JSON_VALUE_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[,\[{]')


def bound_json_values(body: bytes | bytearray, max_values: int) -> None:
    """Raise PayloadTooLarge when a JSON document holds more than about ``max_values`` values.

    For documents whose every list and object is small but one, which a parser would build whole before
    a schema could refuse it (1.7 M ``parameters`` keys in a 20 MiB body: +318 MiB per request). The scan
    stops at the first value over the bound; strings, however long, are one value each.
    """
    count = 0
    for match in _JSON_VALUE_TOKENS.finditer(body):
        if match.end() - match.start() == 1:
            count += 1
            if count > max_values:
                raise PayloadTooLarge(f"the JSON request holds more than {max_values} values")


class _Malformed(Exception):
    pass


def _count_array(text: str, i: int, max_images: int) -> int:
    """Skip the array starting at ``text[i] == '['``, counting its entries; returns the index after it."""
    i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i : i + 1] == "]":
        return i + 1
    count = 0
    while True:
        _, i = _JSON.raw_decode(text, i)
        count += 1
        if count > max_images:
            raise PayloadTooLarge(f"more than {max_images} images in one request; at most {max_images}")
        i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
        if text[i : i + 1] == "]":
            return i + 1
        if text[i : i + 1] != ",":
            raise _Malformed
        i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]


def _decode_images(images: list[ImageIn]) -> list[tuple[str, bytes]]:
    out = []
    for index, image in enumerate(images):
        image_id = image.id if image.id is not None else str(index)
        out.append((image_id, decode_base64(image.data, image_id)))
    return out


def decode_base64(text: str, image_id: str = "") -> bytes:
    """Standard or URL-safe base64, optionally as a ``data:...;base64,`` URL; whitespace is ignored."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"image {image_id!r}: data is not valid base64") from None


def form_flag(fields: dict[str, str], name: str) -> bool | None:
    value = fields.get(name)
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInput(f"form field {name!r} must be true or false, got {value[:20]!r}")


async def until_disconnected(request: Request, work: Awaitable[V]) -> V:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone.

    After the body is read, the server's ``receive`` only returns when the client disconnects (or the
    response is complete), so one waiting task is enough; nothing polls.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientGone("the client disconnected; its work was cancelled")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
