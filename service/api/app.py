"""The FastAPI application: lifespan (queue, front stage, embedded worker), error mapping, request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import metrics
from service.api import generate, health, jobs, models, openai, playground
from service.config import Settings
from service.errors import ServiceError
from service.frontend import PromptFrontend
from service.queue import make_queue
from service.queue.base import JobQueue
from service.schemas import ErrorBody
from service.serving import GenerationService
from service.worker import Worker

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


async def _publish_queue_stats(queue: JobQueue) -> None:
    while True:
        with contextlib.suppress(ServiceError):
            stats = await queue.stats()
            metrics.QUEUE_DEPTH.set(stats.depth)
            metrics.CONSUMER_LAG.set(stats.lag)
            metrics.LIVE_WORKERS.set(stats.live_workers)
        await asyncio.sleep(STATS_INTERVAL_S)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    queue = make_queue(settings)
    frontend = await asyncio.to_thread(PromptFrontend, settings)
    worker = Worker(settings, queue) if settings.worker_in_api else None
    app.state.service = GenerationService(settings, queue, frontend, worker)
    tasks = [asyncio.create_task(_publish_queue_stats(queue))]
    if worker is not None:
        tasks.append(asyncio.create_task(worker.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await queue.close()


def _error_response(error: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else {}
    if error.job_id and error.status in (409, 500, 504):
        headers["Location"] = f"/jobs/{error.job_id}"
    body = ErrorBody.of(error.status, error.message, error.type, error.job_id)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=error.status, headers=headers)


def _validation_response(error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'] if part != 'body') or 'body'}: {e['msg']}" for e in error.errors()
    )
    body = ErrorBody.of(422, f"invalid request - {problems}", "InvalidRequest")
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application; its lifespan loads the front stage and, in embedded mode, a worker."""
    app = FastAPI(
        title="dgq-serve", summary="Text-to-image with DGQ-quantized Stable Diffusion UNets.", lifespan=_lifespan
    )
    app.state.settings = settings or Settings()
    for module in (generate, jobs, openai, models, health, playground):
        app.include_router(module.router)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(error)

    @app.middleware("http")
    async def _observe_latency(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.REQUEST_LATENCY.labels(
            route=route.path if route else "unmatched", method=request.method, status=str(response.status_code)
        ).observe(time.perf_counter() - started)
        return response

    return app
