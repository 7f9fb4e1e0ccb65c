"""Typed Python client for the service (httpx), sync and async.

    with AnomalyClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.score(["face.png"], profile="default", explain=True)
        print(result.results[0].score, result.results[0].is_anomaly)

Errors come back as :class:`ServiceError` with the service's ``code``, ``message``, ``request_id`` and,
for 503, ``retry_after`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from app.web.schemas import Health, ModelCard, ModelList, ProfileSummary, ScoreResponse

ImageSource = bytes | str | os.PathLike[str]
M = TypeVar("M", bound=BaseModel)


class ServiceError(Exception):
    """An error answer from the service (or a body that is not the service's)."""

    def __init__(
        self, status: int, code: str, message: str, request_id: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


# --- shared request building and response parsing ----------------------------------------------------------
def _files(
    images: Sequence[ImageSource], ids: Sequence[str] | None
) -> list[tuple[str, tuple[str, bytes, str]]]:
    if ids is not None and len(ids) != len(images):
        raise ValueError("ids must have one entry per image")
    parts = []
    for index, image in enumerate(images):
        if isinstance(image, bytes):
            name, data = str(index), image
        else:
            path = Path(image)
            name, data = path.name, path.read_bytes()
        parts.append(("files", (ids[index] if ids is not None else name, data, "application/octet-stream")))
    return parts


def _score_request(
    images: Sequence[ImageSource],
    ids: Sequence[str] | None,
    profile: str | None,
    explain: bool,
    features: bool,
    timeout_s: float | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"explain": explain, "features": features}
    if profile is not None:
        params["profile"] = profile
    if timeout_s is not None:
        params["timeout_s"] = timeout_s
    return {"params": params, "files": _files(images, ids)}


def _profile_request(
    name: str,
    images: Sequence[ImageSource],
    fprs: Sequence[float] | None,
    default_fpr: float,
    overwrite: bool,
    source: str,
    aggregation: str | None = None,
) -> dict[str, Any]:
    data = {
        "name": name,
        "default_fpr": str(default_fpr),
        "overwrite": str(overwrite).lower(),
        "source": source,
    }
    if aggregation is not None:
        data["aggregation"] = aggregation
    if fprs:
        data["fprs"] = ",".join(str(f) for f in fprs)
    return {"data": data, "files": _files(images, None)}


def _parse(response: httpx.Response, model: type[M]) -> M:
    if response.is_success:
        return model.model_validate_json(response.content)
    raise _error(response)


def _error(response: httpx.Response) -> ServiceError:
    retry = response.headers.get("retry-after")
    try:
        detail = response.json()["error"]
        code, message, request_id = detail["code"], detail["message"], detail.get("request_id", "")
    except (ValueError, KeyError, TypeError):
        code, message, request_id = (
            "http_error",
            response.text[:500],
            response.headers.get("x-request-id", ""),
        )
    return ServiceError(response.status_code, code, message, request_id, float(retry) if retry else None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# --- clients ---------------------------------------------------------------------------------------------
class AnomalyClient:
    """Blocking client; one connection pool, reuse it (``with AnomalyClient(...) as c:``)."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0, **httpx_options: Any
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_options
        )

    def score(
        self,
        images: Sequence[ImageSource],
        *,
        ids: Sequence[str] | None = None,
        profile: str | None = None,
        explain: bool = False,
        features: bool = False,
        timeout_s: float | None = None,
    ) -> ScoreResponse:
        request = _score_request(images, ids, profile, explain, features, timeout_s)
        return _parse(self.http.post("/v1/score", **request), ScoreResponse)

    def models(self) -> ModelList:
        return _parse(self.http.get("/v1/models"), ModelList)

    def model(self, model_id: str) -> ModelCard:
        return _parse(self.http.get(f"/v1/models/{model_id}"), ModelCard)

    def create_profile(
        self,
        name: str,
        images: Sequence[ImageSource],
        *,
        fprs: Sequence[float] | None = None,
        default_fpr: float = 0.05,
        overwrite: bool = False,
        source: str = "",
        aggregation: str | None = None,
    ) -> ProfileSummary:
        """``aggregation``: the profile's features, ``auto`` (chosen from these images) or one named; None:
        the service's setting."""
        request = _profile_request(name, images, fprs, default_fpr, overwrite, source, aggregation)
        return _parse(self.http.post("/v1/profiles", **request), ProfileSummary)

    def health(self) -> Health:
        """Readiness (``/readyz``): a 503 answer is returned as ``Health(ready=False)``, not raised."""
        return Health.model_validate_json(self.http.get("/readyz").content)

    def live(self) -> Health:
        return _parse(self.http.get("/livez"), Health)

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        if not response.is_success:
            raise _error(response)
        return response.text

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> Health:
        """Poll ``/readyz`` until ready; raise TimeoutError after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            try:
                health = self.health()
                if health.ready:
                    return health
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"service not ready after {timeout:.0f} s")
            time.sleep(interval)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AnomalyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAnomalyClient:
    """The same API for asyncio (``async with AsyncAnomalyClient(...) as c: await c.score(...)``)."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0, **httpx_options: Any
    ) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_options
        )

    async def score(
        self,
        images: Sequence[ImageSource],
        *,
        ids: Sequence[str] | None = None,
        profile: str | None = None,
        explain: bool = False,
        features: bool = False,
        timeout_s: float | None = None,
    ) -> ScoreResponse:
        request = _score_request(images, ids, profile, explain, features, timeout_s)
        return _parse(await self.http.post("/v1/score", **request), ScoreResponse)

    async def models(self) -> ModelList:
        return _parse(await self.http.get("/v1/models"), ModelList)

    async def model(self, model_id: str) -> ModelCard:
        return _parse(await self.http.get(f"/v1/models/{model_id}"), ModelCard)

    async def create_profile(
        self,
        name: str,
        images: Sequence[ImageSource],
        *,
        fprs: Sequence[float] | None = None,
        default_fpr: float = 0.05,
        overwrite: bool = False,
        source: str = "",
        aggregation: str | None = None,
    ) -> ProfileSummary:
        """``aggregation``: the profile's features, ``auto`` (chosen from these images) or one named; None:
        the service's setting."""
        request = _profile_request(name, images, fprs, default_fpr, overwrite, source, aggregation)
        return _parse(await self.http.post("/v1/profiles", **request), ProfileSummary)

    async def health(self) -> Health:
        return Health.model_validate_json((await self.http.get("/readyz")).content)

    async def live(self) -> Health:
        return _parse(await self.http.get("/livez"), Health)

    async def metrics(self) -> str:
        response = await self.http.get("/metrics")
        if not response.is_success:
            raise _error(response)
        return response.text

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> Health:
        end = time.monotonic() + timeout
        while True:
            try:
                health = await self.health()
                if health.ready:
                    return health
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"service not ready after {timeout:.0f} s")
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncAnomalyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
