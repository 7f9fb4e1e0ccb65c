"""Route dependencies as ``Annotated`` aliases: the service, the settings, the request id, API-key checks."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

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


def key_matches(token: str, settings: Settings) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    given = token.encode()
    matched = False
    for key in settings.api_keys:
        matched |= secrets.compare_digest(given, key.get_secret_value().encode())
    return matched


def _check_key(request: Request, settings: Settings) -> None:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')")
    if not key_matches(token, settings):
        raise Unauthorized("invalid API key")


async def require_client(request: Request, settings: SettingsDep) -> None:
    """Scoring and metadata: open when no API keys are configured, otherwise a valid key."""
    if settings.api_keys:
        _check_key(request, settings)


async def admit(service: ServiceDep) -> None:
    """New work is taken only while ready: 503 not_ready while loading or draining after SIGTERM."""
    service.admit()


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Profile creation: always a valid key; without configured keys only if explicitly opened."""
    if settings.api_keys:
        _check_key(request, settings)
    elif not settings.allow_open_profile_creation:
        raise Unauthorized(
            "profile creation is disabled: configure DDM_API_KEYS (or set DDM_ALLOW_OPEN_PROFILE_CREATION)",
            forbidden=True,
        )


async def require_key(request: Request, settings: SettingsDep) -> None:
    """Destructive admin actions (deleting a profile): a valid key, never open."""
    if not settings.api_keys:
        raise Unauthorized("this action needs an API key: configure DDM_API_KEYS", forbidden=True)
    _check_key(request, settings)


ClientAccess = Depends(require_client)
AdminAccess = Depends(require_admin)
KeyAccess = Depends(require_key)
Admission = Depends(admit)
