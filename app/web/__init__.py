"""The HTTP layer (FastAPI): routes, schemas, the error table, auth and request middleware.

``app.web.app.create_app(settings)`` builds the application. This package module imports nothing, so
``app.client`` can use ``app.web.schemas`` without loading FastAPI, torch, numpy or the engine's science
(the schemas read only the plain limits of ``engine/calibration/limits.py``; tests/test_layers.py).
"""
