"""Real processes on loopback for tests and benchmarks: a redis-server, `dgq-serve` and `dgq-worker`.

Importable without pytest (bench/bench_load.py uses it), so nothing here is a fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from service.queue import keys

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:g} s")


class RedisServer:
    """A redis-server child process on a free port; `stop()`/`start()` simulate an outage on the same port.

    With `appendonly=True` every write is in the append-only file before Redis answers (`appendfsync always`),
    so `kill()` (SIGKILL) followed by `start()` loses nothing that was acknowledged.
    """

    def __init__(self, data_dir: Path, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 10, "redis-server")
        if self.appendonly:  # Redis answers LOADING while it replays the append-only file
            deadline = time.monotonic() + 30
            while True:
                try:
                    with redis.Redis.from_url(self.url) as client:
                        client.ping()
                        return
                except redis.exceptions.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its files and exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what was already written."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        with redis.Redis.from_url(self.url) as client:
            client.flushall()


def console_script(name: str) -> Path:
    """The installed console script `name` (`dgq-serve`, `dgq-worker`, ...) of the running environment."""
    return Path(sys.executable).parent / name


def spawn(command: str, env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Run the console script `command` (`dgq-serve` or `dgq-worker`) in a child process, output to `log_file`."""
    with log_file.open("ab") as log:
        return subprocess.Popen([console_script(command)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _env_value(value: object) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


class ServiceProcesses:
    """`dgq-serve` and any number of `dgq-worker` processes on one Redis, configured through `DGQ_*` variables.

    Args:
        model_dir (`Path | None`): diffusers model directory, served unquantized; None when `settings` names
            `models`.
        redis_url (`str`): the Redis all processes share.
        log_dir (`Path`): where each process's output goes (`api.log`, `<worker name>.log`).
        settings (`dict[str, object]`): `Settings` fields for every process, e.g. `{"queue_max": 8}`; dicts and
            lists (`models`) are passed as JSON.
    """

    def __init__(self, model_dir: Path | None, redis_url: str, log_dir: Path, settings: dict[str, object]) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        model = {} if model_dir is None else {"DGQ_MODEL": str(model_dir), "DGQ_QUANTIZED": "none"}
        self.env = {  # DGQ_HOST pinned: loopback only, whatever the environment says (the image sets 0.0.0.0)
            **os.environ, "DGQ_HOST": "127.0.0.1", **model,
            "REDIS_URL": redis_url, "DGQ_TORCH_THREADS": "1", "DGQ_WARMUP_STEPS": "1", "DGQ_WORKER_METRICS_PORT": "0",
            **{f"DGQ_{name.upper()}": _env_value(value) for name, value in settings.items()},
        }
        self.model = str(model_dir) if model_dir is not None else next(iter(settings["models"]))
        """The name of the default model (its job stream: `keys.jobs_stream(model)`)."""
        self.api_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def start_api(self) -> subprocess.Popen:
        """Start `dgq-serve` on `api_port` (the same port after a restart)."""
        self.api = spawn("dgq-serve", self.env | {"DGQ_PORT": str(self.api_port)}, self.log_dir / "api.log")
        return self.api

    def start_worker(self, name: str, settings: dict[str, object] | None = None) -> subprocess.Popen:
        """Start `dgq-worker` with worker id `name` and, on top of the common ones, its own `settings`."""
        env = self.env | {f"DGQ_{key.upper()}": _env_value(value) for key, value in (settings or {}).items()}
        self.workers[name] = spawn("dgq-worker", env | {"DGQ_WORKER_ID": name}, self.log_dir / f"{name}.log")
        return self.workers[name]

    def live_workers(self) -> set[str]:
        """Names of the workers with a fresh heartbeat in Redis."""
        with redis.Redis.from_url(self.redis_url) as client:
            prefix = keys.worker("")
            return {key.decode().removeprefix(prefix) for key in client.scan_iter(match=keys.WORKER_PATTERN)}

    def wait_ready(self, workers: set[str], timeout_s: float = 240) -> None:
        """Wait until the API answers /readyz with 200 and every worker in `workers` heartbeats."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in [("api", self.api), *self.workers.items()]:
                if process is not None and process.poll() is not None and (name == "api" or name in workers):
                    raise RuntimeError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")
            try:
                if workers <= self.live_workers() and httpx.get(f"{self.base_url}/readyz").status_code == 200:
                    return
            except (httpx.TransportError, redis.exceptions.ConnectionError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready within {timeout_s:g} s: {self.log_tail('api')}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of a process's log (`api` or a worker name)."""
        log_file = self.log_dir / f"{name}.log"
        return log_file.read_text(errors="replace")[-chars:] if log_file.exists() else "(no log)"

    def processes(self) -> dict[str, subprocess.Popen]:
        """Every running process by name ("api", worker names)."""
        running = {"api": self.api, **self.workers}
        return {name: process for name, process in running.items() if process is not None and process.poll() is None}

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM every process (workers drain), SIGKILL what has not exited after `timeout_s`."""
        running = self.processes()
        for process in running.values():
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
