"""``create_app(settings)``: assembles settings, metrics, the scoring service, middleware and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app import __version__
from app.service.metrics import SCORE_BUCKETS, Metrics
from app.service.scoring import Engine, ScoringService
from app.settings import Settings
from app.web.deps import open_profile_creation
from app.web.errors import install_error_handlers
from app.web.middleware import RequestContext
from app.web.oip.errors import OipErrors
from app.web.openapi import publish_limits
from app.web.routes import docs, health, models, scoring, v2

DESCRIPTION = """Zero-shot image anomaly scoring along a pretrained diffusion model's denoising trajectory.

Images from many requests share model batches (dynamic batching); each answer is calibrated against a
profile of normal images. Errors are `{"error": {"code", "message", "request_id"}}`."""


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the ASGI app. The model loads on a background thread when the app starts (lifespan), so
    ``/livez`` answers at once and ``/readyz`` turns 200 after warm-up; shutdown drains the queue."""
    settings = settings if settings is not None else Settings()  # type: ignore[call-arg]  # from env
    metrics = Metrics(CollectorRegistry(), score_buckets=settings.score_buckets or SCORE_BUCKETS)
    service = ScoringService(settings, metrics, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="ddm-anomaly",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs, /redoc and /ui come from app.web.routes.docs, with bundled assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    install_error_handlers(app, metrics)

    def body_limit(path: str) -> int:
        """Profile creation gets its own cap only where it takes an admin key: anonymous uploads (open
        creation) get the scoring cap."""
        admin = path == "/v1/profiles" and not open_profile_creation(settings)
        return settings.max_profile_upload_bytes if admin else settings.max_upload_bytes

    app.add_middleware(RequestContext, metrics=metrics, body_limit=body_limit)
    app.add_middleware(OipErrors)  # outermost: /v2 error bodies in the protocol's shape
    for module in (scoring, models, health, v2):
        app.include_router(module.router)
    docs.install(app)
    publish_limits(
        app,
        {"/v1/score": settings.max_images_per_request, "/v1/profiles": settings.max_profile_images},
        min_timeout_s=settings.min_request_timeout_s,
    )
    return app
