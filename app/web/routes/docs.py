"""Pages for people: Swagger UI at ``/docs``, ReDoc at ``/redoc`` and the inspection page at ``/ui`` (``/``
redirects there).

Everything a page loads comes from this server: the Swagger UI and ReDoc bundles are the ones the
``fastapi-offline`` distribution ships (served under ``/static/docs``), the inspection page is static HTML,
CSS and JavaScript from ``app/web/static/ui`` (no build step). No CDN, no web fonts: the pages work in an
air-gapped cluster. Each page also carries a Content-Security-Policy that lets the browser fetch from this
origin only (the ReDoc bundle shows its vendor's logo from cdn.redoc.ly; the policy keeps that request from
ever being made), and Swagger UI's online validator badge is off.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
DOCS_STATIC = "/static/docs"
UI_STATIC = "/static/ui"

router = APIRouter(include_in_schema=False)

# /docs and /redoc need inline scripts and styles: FastAPI's Swagger UI page starts the bundle from an
# inline script, both bundles inject styles. ReDoc runs its search in a worker made from a blob: URL.
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "frame-ancestors 'self'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)


# The inspection page has no inline script or style (it sets styles through the CSSOM, which a policy
# without 'unsafe-inline' allows): the strict policy, which blocks any injected script or style.
UI_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'self'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)


def _same_origin_only(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
    )
    return _same_origin_only(page)


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return _same_origin_only(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
        with_google_fonts=False,
    )
    return _same_origin_only(page)


@router.get("/")
async def root_page(request: Request) -> RedirectResponse:
    """A browser pointed at the server lands on the inspection page (the API's index is /docs)."""
    return RedirectResponse(f"{_root(request)}/ui")


@router.get("/ui")
async def inspection_page() -> FileResponse:
    """Choose a profile, drop images, see each verdict with its heat map (calls /v1/models, /v1/score)."""
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": UI_CSP}
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=headers)


def install(app: FastAPI) -> None:
    """Add the pages and their static assets to ``app`` (created with ``docs_url=None, redoc_url=None``)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount(UI_STATIC, StaticFiles(directory=UI_DIR), name="ui-assets")
    app.include_router(router)
