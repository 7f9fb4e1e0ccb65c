"""Route dependencies as ``Annotated`` aliases: the service, the settings, the request id, API-key checks."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from app.errors import Unauthorized
from app.service.scoring import ScoringService
from app.settings import Settings
from app.web.errors import request_id_for


async def get_service(request: Request) -> ScoringService:
    service: ScoringService = request.app.state.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_request_id(request: Request) -> str:
    return request_id_for(request)


ServiceDep = Annotated[ScoringService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestId = Annotated[str, Depends(get_request_id)]


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def key_matches(token: str, keys: Sequence[SecretStr]) -> bool:
    """Constant-time comparison against every key in ``keys`` (no early exit on a match)."""
    given = token.encode()
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(given, key.get_secret_value().encode())
    return matched


def _check_key(request: Request, settings: Settings, *, admin: bool = False) -> None:
    """A valid key of either kind, else 401; with ``admin``, a scoring key is refused with 403."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')")
    is_admin = key_matches(token, settings.admin_api_keys)
    is_client = key_matches(token, settings.api_keys)
    if not (is_admin or is_client):
        raise Unauthorized("invalid API key")
    if admin and not is_admin:
        raise Unauthorized(
            "this key may score but not administer profiles (DDM_ADMIN_API_KEYS)", forbidden=True
        )


async def require_client(request: Request, settings: SettingsDep) -> None:
    """Scoring and metadata: open when no scoring keys are configured, otherwise a scoring or admin key."""
    if settings.api_keys:
        _check_key(request, settings)


async def admit(service: ServiceDep) -> None:
    """New work is taken only while ready: 503 not_ready while loading or draining after SIGTERM."""
    service.admit()


def open_profile_creation(settings: Settings) -> bool:
    """Anonymous profile creation: only when explicitly allowed and no keys of either kind are set."""
    return settings.allow_open_profile_creation and not (settings.api_keys or settings.admin_api_keys)


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Profile creation: an admin key; without any configured keys only if explicitly opened."""
    if open_profile_creation(settings):
        return
    if not (settings.api_keys or settings.admin_api_keys):
        raise Unauthorized(
            "profile creation is disabled: configure DDM_ADMIN_API_KEYS "
            "(or set DDM_ALLOW_OPEN_PROFILE_CREATION)",
            forbidden=True,
        )
    _check_key(request, settings, admin=True)


async def require_admin_key(request: Request, settings: SettingsDep) -> None:
    """Destructive admin actions (deleting a profile): an admin key, never open."""
    if not settings.admin_api_keys:
        raise Unauthorized("this action needs an admin key: configure DDM_ADMIN_API_KEYS", forbidden=True)
    _check_key(request, settings, admin=True)


ClientAccess = Depends(require_client)
AdminAccess = Depends(require_admin)
AdminKeyAccess = Depends(require_admin_key)
Admission = Depends(admit)
