"""The registry of scoring methods: ``register``, ``unregister``, ``get``, ``names``.

The built-in methods are registered by ``app.engine.methods`` on import; everything that lists or checks
method names (``Settings.method``, CLI choices, profile validation, density selection, the statistics
driver) asks here, so a registered method is usable everywhere at once.
"""

from __future__ import annotations

from app.engine.methods.base import Method

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method under its ``name``; a name is registered once."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; this build has {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (the built-ins first)."""
    return tuple(_METHODS)
