"""Entry points behind `dgq serve` and `dgq worker` (wired in dgq_core/cli.py). Flags are the `Settings` fields
(`--max_batch 8`, `--redis_url redis://...`); environment variables `DGQ_*` (and `REDIS_URL`) work as well."""

from __future__ import annotations

import asyncio
import logging
import signal

from service.config import Settings

log = logging.getLogger(__name__)


def _process_settings(argv: list[str] | None, prog: str) -> Settings:
    """Parse flags and environment; set up logging and torch's thread count for this process."""
    settings = Settings(_cli_parse_args=argv if argv is not None else [], _cli_prog_name=prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return settings


def serve_main(argv: list[str] | None = None) -> int:
    """`dgq serve`: the HTTP API (plus an in-process queue and worker unless a Redis URL is given)."""
    import uvicorn

    from service.api.app import create_app

    settings = _process_settings(argv, "dgq serve")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


async def run_worker(settings: Settings) -> None:
    """Serve jobs from the configured Redis until SIGTERM/SIGINT."""
    from service.queue import make_queue
    from service.worker import Worker

    queue = make_queue(settings)
    task = asyncio.create_task(Worker(settings, queue).run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("worker stopped")
    finally:
        await queue.close()


def worker_main(argv: list[str] | None = None) -> int:
    """`dgq worker`: load the quantized UNet + VAE, warm up, serve jobs from Redis; `/metrics` on its own port."""
    from prometheus_client import start_http_server

    settings = _process_settings(argv, "dgq worker")
    if not settings.redis_url:
        log.error("dgq worker needs a Redis URL (--redis_url or REDIS_URL): workers share jobs through Redis")
        return 2
    if settings.worker_metrics_port is not None:
        server, _ = start_http_server(settings.worker_metrics_port, addr=settings.host)
        log.info("worker metrics on http://%s:%d/metrics", settings.host, server.server_port)
    asyncio.run(run_worker(settings))
    return 0
