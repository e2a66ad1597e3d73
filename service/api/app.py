"""The FastAPI application: lifespan (queue, served models and their prompt stages, embedded workers, rate limiter,
metrics port), error mapping, body-size limit, CORS, request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service import metrics
from service.api import docs, generate, health, jobs, loras, models, openai, playground, prometheus
from service.api.limits import BodySizeLimit
from service.api.responses import error_response
from service.config import Settings
from service.errors import ServiceError
from service.prompts import PromptStage
from service.queue import make_queue
from service.queue.base import JobQueue
from service.ratelimit import make_rate_limiter
from service.schemas import ErrorBody
from service.served_model import ServedModel
from service.serving import GenerationService
from service.worker import Worker

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


async def _publish_queue_stats(queue: JobQueue, models: list[str]) -> None:
    while True:
        with contextlib.suppress(ServiceError):
            for model in models:
                stats = await queue.stats(model)
                metrics.QUEUE_DEPTH.labels(model=model).set(stats.depth)
                metrics.CONSUMER_LAG.labels(model=model).set(stats.lag)
                metrics.LIVE_WORKERS.labels(model=model).set(stats.live_workers)
        await asyncio.sleep(STATS_INTERVAL_S)


def load_prompt_stages(settings: Settings) -> dict[str, PromptStage]:
    """A prompt stage per served model; models on the same base model share one text encoder."""
    stages: dict[str, PromptStage] = {}
    by_base: dict[str, PromptStage] = {}
    for name in settings.served_models:
        model = ServedModel(settings, name)
        stages[name] = PromptStage(model, settings.prompt_cache_size, text_side_of=by_base.get(model.resolved.base))
        by_base.setdefault(model.resolved.base, stages[name])
    return stages


def _log_worker_failure(task: asyncio.Task) -> None:
    """Say in the log why the embedded worker stopped (it leaves /readyz at 503), instead of keeping the error
    in the task until shutdown."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("the embedded worker stopped: %r; /readyz stays 503", error, exc_info=error)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    queue = make_queue(settings)
    prompts = await asyncio.to_thread(load_prompt_stages, settings)
    workers = [Worker(settings, queue, stage.model) for stage in prompts.values()] if settings.worker_in_api else []
    app.state.service = GenerationService(settings, queue, prompts, workers)
    app.state.rate_limiter = limiter = make_rate_limiter(settings)
    app.state.metrics_server = None
    if settings.metrics_port is not None:
        app.state.metrics_server = prometheus.serve_metrics_port(settings.host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, app.state.metrics_server.server_port)
    tasks = [asyncio.create_task(_publish_queue_stats(queue, list(prompts)))]
    for worker in workers:
        worker_task = asyncio.create_task(worker.run())
        worker_task.add_done_callback(_log_worker_failure)
        tasks.append(worker_task)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if app.state.metrics_server is not None:
            app.state.metrics_server.shutdown()
            app.state.metrics_server.server_close()
        if limiter is not None:
            await limiter.close()
        await queue.close()


def _validation_response(error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'] if part != 'body') or 'body'}: {e['msg']}" for e in error.errors()
    )
    body = ErrorBody.of(422, f"invalid request - {problems}", "InvalidRequest")
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=422)


def _http_error_response(request: Request, error: HTTPException) -> JSONResponse:
    """Routing's own errors (unknown path 404, wrong method 405) in the service's error format."""
    phrase = HTTPStatus(error.status_code).phrase
    message = f"{error.detail}: {request.method} {request.url.path}"
    if error.status_code in (404, 405):
        message += " - the routes and their methods are listed at /docs"
    body = ErrorBody.of(error.status_code, message, phrase.replace(" ", ""))
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=error.status_code,
                        headers=error.headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application; its lifespan loads the served models' text sides and, in embedded mode, a worker for
    each."""
    app = FastAPI(
        title="dgq-serve", summary="Text-to-image, image-to-image and inpainting with DGQ-quantized Stable Diffusion UNets.", lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # `docs` serves Swagger UI from local files
    )
    app.state.settings = settings = settings or Settings()
    routers = [generate, jobs, openai, models, loras, health, playground, docs]
    if settings.metrics_port is None:
        routers.append(prometheus)
    for module in routers:
        app.include_router(module.router)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _http_error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(error)

    # Added first, so it runs inside the latency middleware (413s are counted) and inside CORS (413s carry the CORS
    # headers a browser needs to read them).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, upload_max_bytes=settings.max_upload_bytes)

    @app.middleware("http")
    async def _observe_latency(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.REQUEST_LATENCY.labels(
            route=route.path if route else "unmatched", method=request.method, status=str(response.status_code)
        ).observe(time.perf_counter() - started)
        return response

    if settings.cors_allow_origins:
        # Bearer keys, not cookies: no credentials mode. Exposed: what clients of the async flow read.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Prefer"],
            expose_headers=["Location", "Retry-After", "X-Job-Id"],
        )
    return app
