"""The HTTP layer (FastAPI): routes, schemas, the error table, auth and request middleware."""

from app.web.app import create_app

__all__ = ["create_app"]
