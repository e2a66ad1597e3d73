"""Liveness, readiness and the Prometheus scrape endpoint (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
