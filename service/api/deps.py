"""`Annotated` dependencies that keep the routes short: the service, the settings, and access (API key + rate
limit, or the key of `/metrics`)."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import key_id, match_api_key
from service.config import Settings
from service.errors import RateLimited, Unauthorized
from service.ratelimit import RateLimiter
from service.serving import GenerationService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_rate_limiter(request: Request) -> RateLimiter | None:
    return request.app.state.rate_limiter


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RateLimiterDep = Annotated[RateLimiter | None, Depends(get_rate_limiter)]
# auto_error=False: a missing key is answered by `_bearer_key` in the service's error format (and only when keys
# are configured); the schemes put an "Authorize" button into /docs.
ApiKey = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(scheme_name="APIKey", description="An API key (when the deployment has keys).",
                       auto_error=False)),
]
MetricsKey = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(scheme_name="MetricsKey", description="A metrics key (when the deployment has them).",
                       auto_error=False)),
]


def _bearer_key(key_hashes: list[str], credentials: HTTPAuthorizationCredentials | None) -> str:
    """The stored hash matching the request's `Authorization: Bearer <key>`; `Unauthorized` otherwise."""
    matched = match_api_key(credentials.credentials, key_hashes) if credentials else None
    if matched is None:
        raise Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
    return matched


async def authorize(request: Request, settings: SettingsDep, limiter: RateLimiterDep, credentials: ApiKey) -> None:
    """With API keys configured, demand a valid bearer key; with a rate limit, take a token from the bucket of that
    key (of the client address when the API has no keys) or answer 429 with the wait."""
    key_hashes = settings.api_key_hashes()
    if key_hashes:
        identity = f"key:{key_id(_bearer_key(key_hashes, credentials))}"
    else:
        identity = f"addr:{request.client.host if request.client else 'unknown'}"
    if limiter is None:
        return
    wait_s = await limiter.take(identity)
    if wait_s > 0:
        per_minute = settings.rate_limit_per_minute
        raise RateLimited(
            f"rate limit of {per_minute:g} requests per minute (bursts of {settings.rate_limit_burst}) reached for "
            f"this {'API key' if key_hashes else 'client'}: retry in {wait_s:.1f} s",
            retry_after_s=max(1, math.ceil(wait_s)),
        )


def require_metrics_key(settings: SettingsDep, credentials: MetricsKey) -> None:
    """With `metrics_api_keys` configured, `/metrics` demands one of them as a bearer key."""
    if key_hashes := settings.metrics_key_hashes():
        _bearer_key(key_hashes, credentials)


Authenticated = Depends(authorize)
MetricsAuthenticated = Depends(require_metrics_key)
