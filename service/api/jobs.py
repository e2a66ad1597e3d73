"""`/jobs/{id}`: status, images, cancel, server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from service.api.deps import Authenticated, ServiceDep
from service.schemas import ErrorBody, JobEvent, JobState

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Authenticated])

_ERRORS = {404: {"model": ErrorBody}, 410: {"model": ErrorBody}}


@router.get("/{job_id}", responses=_ERRORS)
async def job_status(job_id: str, service: ServiceDep) -> JobState:
    return await service.job(job_id)


@router.get("/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def job_image(job_id: str, index: int, service: ServiceDep) -> Response:
    return Response(await service.image(job_id, index), media_type="image/png")


@router.post("/{job_id}/cancel", responses=_ERRORS)
async def cancel_job(job_id: str, service: ServiceDep) -> JobState:
    """Idempotent: cancelling an ended job answers its state unchanged."""
    return await service.cancel(job_id)


def _sse(events: AsyncIterator[JobEvent]) -> AsyncIterator[str]:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"event: {event.event}\ndata: {json.dumps(event.data)}\n\n"

    return lines()


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
async def job_events(job_id: str, service: ServiceDep) -> StreamingResponse:
    """Server-sent events: queued, started, one per denoising step, then succeeded | failed | cancelled."""
    return StreamingResponse(
        _sse(await service.events(job_id)), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
