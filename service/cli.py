"""The service's console scripts: `dgq-serve`, `dgq-worker` and `dgq-hash-key`. Flags of serve and worker are the
`Settings` fields (`--max_batch 8`, `--redis_url redis://...`); environment variables `DGQ_*` (and `REDIS_URL`) work
as well."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import logging
import signal
import sys

from pydantic import ValidationError

from service.config import Settings

log = logging.getLogger(__name__)

METRICS_PORT_TRIES = 64
"""Ports a worker tries for its metrics, from `worker_metrics_port` on, when the first ones are taken (workers of
one host, one per GPU, each take the next)."""


def _process_settings(argv: list[str] | None, prog: str) -> Settings:
    """Parse flags and environment (exit 2 saying what is wrong when they do not validate); set up logging and
    torch's thread count for this process."""
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv, _cli_prog_name=prog)
    except ValidationError as error:
        # The message names each bad setting and what to do; a traceback would only bury it.
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return settings


def serve_main(argv: list[str] | None = None) -> int:
    """`dgq-serve`: the HTTP API (plus an in-process queue and worker unless a Redis URL is given)."""
    import uvicorn

    from service.api.app import create_app

    settings = _process_settings(argv, "dgq-serve")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


async def run_worker(settings: Settings) -> None:
    """Serve jobs from the configured Redis. The first SIGTERM/SIGINT drains (no new jobs; the held ones are
    finished and acknowledged, then it returns); a second one stops at once, leaving held jobs to the reaper."""
    from service.queue import make_queue
    from service.worker import Worker

    queue = make_queue(settings)
    worker = Worker(settings, queue)
    task = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if worker.stopping:
            log.warning("second signal: stopping now; jobs still held are reclaimed by other workers")
            task.cancel()
            return
        log.info("draining: taking no new jobs, finishing the ones held (signal again to stop at once)")
        worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await task
        log.info("worker drained and stopped")
    except asyncio.CancelledError:
        log.info("worker stopped")
    finally:
        await queue.close()


def start_worker_metrics(host: str, port: int) -> int:
    """Serve the worker's `/metrics` on `host:port`, or on the next free one of `METRICS_PORT_TRIES` ports when it
    is taken (logged); 0 = any free port.

    Returns:
        `int`: the port bound.

    Raises:
        ValueError: no port could be bound; the message names the setting and what to do.
    """
    from prometheus_client import start_http_server

    for candidate in range(port, min(port + METRICS_PORT_TRIES, 65536)) if port else [0]:
        try:
            server, _ = start_http_server(candidate, addr=host)
        except OSError as error:
            if error.errno == errno.EADDRINUSE and port:
                continue
            raise ValueError(
                f"cannot serve the worker metrics on {host}:{candidate} (worker_metrics_port, host): "
                f"{error.strerror or error}; set DGQ_WORKER_METRICS_PORT to a free port (0 = any) or DGQ_HOST"
            ) from None
        if candidate != port:
            log.warning("worker metrics port %d is taken (worker_metrics_port): serving them on %d instead",
                        port, server.server_port)
        return server.server_port
    raise ValueError(
        f"worker_metrics_port {port} and the {METRICS_PORT_TRIES - 1} ports after it are taken: set "
        "DGQ_WORKER_METRICS_PORT to a free port (0 = any)"
    )


def worker_main(argv: list[str] | None = None) -> int:
    """`dgq-worker`: load one served model's quantized UNet + VAE (`worker_model`), warm up, serve its jobs from Redis;
    `/metrics` on its own port."""
    settings = _process_settings(argv, "dgq-worker")
    if not settings.redis_url:
        log.error("dgq-worker needs a Redis URL (--redis_url or REDIS_URL): workers share jobs through Redis")
        return 2
    try:
        model = settings.worker_model_name
    except ValueError as error:
        print(f"dgq-worker: error: {error}", file=sys.stderr)
        return 2
    log.info("serving model %s", model)
    if settings.worker_metrics_port is not None:
        try:
            port = start_worker_metrics(settings.host, settings.worker_metrics_port)
        except ValueError as error:
            # one line naming the setting: a traceback would only bury it
            print(f"dgq-worker: error: {error}", file=sys.stderr)
            return 2
        log.info("worker metrics on http://%s:%d/metrics", settings.host, port)
    asyncio.run(run_worker(settings))
    return 0


def hash_key_main(argv: list[str] | None = None) -> int:
    """`dgq-hash-key`: read an API key from stdin (or a prompt on a terminal) and print the `sha256:<hex>` line to
    put into `DGQ_API_KEYS`; `--generate` makes a new random key and prints it, then its hash.

    Args:
        argv (`list[str] | None`): the arguments (sys.argv[1:] when None).
    """
    from service.auth import WeakKey, generate_api_key, hash_api_key

    parser = argparse.ArgumentParser(
        prog="dgq-hash-key", description="Print the hash of an API key to store in DGQ_API_KEYS (comma-separated)."
    )
    parser.add_argument("--generate", action="store_true",
                        help="make a new random key; prints the key (give it to the client), then its hash")
    args = parser.parse_args(argv)
    if args.generate:
        key = generate_api_key()
        print(key)
    elif sys.stdin.isatty():
        key = getpass.getpass("API key (not echoed): ")
    else:
        key = sys.stdin.readline().strip()  # one key per call; the line break of `echo` is not part of it
    try:
        print(hash_api_key(key))
    except WeakKey as error:
        print(f"dgq-hash-key: error: {error}", file=sys.stderr)
        return 2
    return 0
