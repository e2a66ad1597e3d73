"""`Annotated` dependencies that keep the routes short."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.config import Settings
from service.errors import Unauthorized
from service.serving import GenerationService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_api_key(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """With API keys configured, demand `Authorization: Bearer <key>` (constant-time comparison)."""
    accepted = settings.accepted_api_keys()
    if not accepted:
        return
    scheme, _, token = (authorization or "").partition(" ")
    presented = token.strip().encode()
    matches = [hmac.compare_digest(presented, key) for key in accepted]  # compare with all, no early exit
    if scheme.lower() != "bearer" or not any(matches):
        raise Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>'")


Authenticated = Depends(require_api_key)
