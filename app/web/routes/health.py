"""Liveness, readiness (plus the Open Inference Protocol v2 aliases) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.web.deps import ServiceDep
from app.web.schemas import Health

router = APIRouter(tags=["health"])


# HEAD answers like GET without a body (load balancers and uptime checkers probe with HEAD); left out of
# the OpenAPI description, which lists each route once. Decorators register bottom-up: the GET routes come
# first, so a 405 on these paths names the documented method in its Allow header.
@router.head("/livez", include_in_schema=False)
@router.head("/v2/health/live", include_in_schema=False)
@router.get("/livez", response_model=Health)
@router.get("/v2/health/live", response_model=Health)
async def livez(service: ServiceDep) -> Health:
    """The process is up and answering (also while the model loads)."""
    return Health(status="live", live=True, ready=service.ready)


@router.head("/readyz", include_in_schema=False)
@router.head("/v2/health/ready", include_in_schema=False)
@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
@router.get("/v2/health/ready", response_model=Health, responses={503: {"model": Health}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while loading, after a failed load, and when
    draining after SIGTERM (the reason of a failed load is in the server log)."""
    model = service.model_info()
    body = Health(status=model.state, live=True, ready=model.ready, model_id=model.model_id)
    return JSONResponse(body.model_dump(), status_code=200 if model.ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    service.update_gauges()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
