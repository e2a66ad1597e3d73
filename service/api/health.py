"""Liveness and readiness (no authentication: probes call them)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ServiceDep
from service.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(service: ServiceDep) -> dict[str, bool]:
    """Text encoder loaded, worker warm (embedded), queue reachable, at least one live worker."""
    return await service.readiness()
