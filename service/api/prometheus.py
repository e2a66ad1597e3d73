"""`/metrics` on the API port, behind `metrics_api_keys` when set. With `metrics_port` set the app leaves this
router out and serves the metrics on that port instead (`serve_metrics_port`)."""

from __future__ import annotations

from http.server import ThreadingHTTPServer

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from service.api.deps import MetricsAuthenticated
from service.schemas import ErrorBody

router = APIRouter(tags=["health"], dependencies=[MetricsAuthenticated])


@router.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorBody}})
async def prometheus_metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def serve_metrics_port(host: str, port: int) -> ThreadingHTTPServer:
    """Start prometheus_client's own server for `/metrics` on `host:port` (0 = any free port) in a thread.

    Args:
        host (`str`): address to bind.
        port (`int`): port to bind.

    Returns:
        `ThreadingHTTPServer`: call `shutdown()` to stop it; `server_port` is the bound port.
    """
    server, _ = start_http_server(port, addr=host)
    return server
