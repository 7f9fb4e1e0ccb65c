"""The one table from domain errors to HTTP, and the handlers that apply it.

Every error answer has the body ``{"error": {"code", "message", "request_id"}}``, is counted in
``anomaly_refusals`` by reason and logged with its request id. Clients never see a stack trace.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import (
    DDMError,
    DeadlineExceeded,
    EngineFailure,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ProfileConflict,
    ProfileMismatch,
    ProfileNotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from app.service.metrics import Metrics
from app.web.schemas import ErrorBody

log = logging.getLogger("app.web")

CLIENT_CLOSED = 499  # nginx's code: the client went away; nobody reads this answer


class ClientGone(Exception):
    """The client disconnected while its request waited; the work was cancelled."""


# Most specific first: the first row the error is an instance of decides (status, refusal reason).
ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (PayloadTooLarge, 413, "too_large"),
    (InvalidInput, 400, "bad_input"),
    (ProfileNotFound, 404, "not_found"),
    (ModelNotFound, 404, "not_found"),
    (ProfileMismatch, 409, "bad_input"),
    (ProfileConflict, 409, "bad_input"),
    (Unauthorized, 401, "unauthorized"),  # 403 "forbidden" when .forbidden
    (Overloaded, 503, "queue_full"),
    (ModelNotReady, 503, "not_ready"),
    (DeadlineExceeded, 504, "timeout"),
    (EngineFailure, 500, "engine_error"),
    (DDMError, 500, "engine_error"),
    (ClientGone, CLIENT_CLOSED, "cancelled"),
    (ClientDisconnect, CLIENT_CLOSED, "cancelled"),
)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}
NOT_READY_RETRY_AFTER_S = 5

# For OpenAPI: every error answer the service gives; each route lists its own with ``error_responses``.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "undecodable image or bad field"),
        (401, "missing or wrong API key"),
        (403, "action disabled for this deployment"),
        (404, "unknown profile or model"),
        (409, "the profile was made for another model or method options, or its name is taken"),
        (413, "body, image count or pixels over the caps"),
        (415, "unsupported content type or image format"),
        (422, "request validation failed"),
        (500, "the model failed on this request's batch"),
        (503, "overloaded (Retry-After) or not ready"),
        (504, "deadline passed"),
    )
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """The OpenAPI ``responses`` entries of one operation's possible errors."""
    return {status: ERROR_RESPONSES[status] for status in statuses}


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error code, refusal reason) for a domain error."""
    for cls, status, reason in ERROR_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, Unauthorized) and exc.forbidden:
                return 403, "forbidden", "forbidden"
            code = getattr(exc, "code", "cancelled")
            return status, code, reason
    return 500, "internal", "engine_error"


def request_id_for(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def error_response(
    status: int, code: str, message: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def refuse(request: Request, status: int, code: str, reason: str, message: str) -> str:
        request_id = request_id_for(request)
        metrics.refuse(reason)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "refused %s %s -> %d %s: %s [request_id=%s]", request.method, request.url.path,
                status, code, message, request_id)  # fmt: skip
        return request_id

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        status, code, reason = classify(exc)
        message = str(exc) or code
        if status == 500 and not isinstance(exc, DDMError):
            message = "internal error"
        request_id = refuse(request, status, code, reason, message)
        headers: dict[str, str] = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        elif isinstance(exc, ModelNotReady):
            headers["Retry-After"] = str(NOT_READY_RETRY_AFTER_S)
        elif status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(status, code, message, request_id, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        parts = []
        for err in errors[:5]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        message = "; ".join(parts) or "request validation failed"
        request_id = refuse(request, 422, "validation", "validation", message)
        return error_response(422, "validation", message, request_id)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        code = HTTP_CODES.get(status, "bad_request" if status < 500 else "internal")
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else ""
        reason = {404: "not_found", 413: "too_large", 415: "unsupported_media_type"}.get(status, "bad_input")
        request_id = refuse(request, status, code, reason, str(detail))
        headers = getattr(exc, "headers", None)
        return error_response(status, code, str(detail), request_id, headers)

    for cls, _, _ in ERROR_TABLE:
        app.add_exception_handler(cls, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Anything else reaches RequestContext (app.web.middleware), which answers 500 without details.
