"""Load: `dgq-serve` and two `dgq-worker` processes on a real redis-server, driven at twice the queue bound.

A bounded load generator on loopback (asyncio + httpx): `2 * queue_max` clients (by default) each send requests
back to back, and after a 429 pause `--backoff-s` (shorter than Retry-After, so the overload holds) before the next
one. The mix: `POST /generate` text-to-image, a share synchronous (wait for the PNG) and the rest asynchronous (202);
`--edit-share` edits of a small uploaded image, half as `POST /generate` multipart (async) and half through OpenAI's
`POST /v1/images/edits` (sync), every other one with a mask; `--stream-share` OpenAI streaming
`POST /v1/images/generations` (`stream=true, partial_images=1`, read to the end). Each request picks a sampler of
the model (or none) at random; previews are on (every 2 steps). It stops at
`--max-requests` or `--duration-s`, whichever comes first, then polls `GET /jobs/{id}` of every accepted job until
all ended (or `--drain-timeout-s`). Meanwhile it samples the resident memory of the API and worker processes,
Redis' `used_memory` and the length of the jobs stream.

Checked and reported: every answer is 200/202, or 429 with Retry-After (anything else is counted as a bad
answer); jobs lost (accepted but not ended: succeeded, failed or cancelled); requests/s; p50/p95/p99 latency
overall and per answer; the 429 share; memory at start, peak and end; the peak queue depth (jobs queued or
running, never above `queue_max`).

    .venv/bin/python bench/bench_load.py --queue-max 16 --duration-s 60 --max-requests 3000 --json load.json

Without `--model` it builds the tests' tiny random Stable Diffusion model in a temporary directory (the load is on
the service, not the UNet).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
import redis
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from local_cluster import RedisServer, ServiceProcesses  # noqa: E402

from bench.common import load_average  # noqa: E402
from service.queue import keys  # noqa: E402

ENDED = {"succeeded", "failed", "cancelled"}
WORKER_NAMES = ("worker-a", "worker-b")
SAMPLERS = (None, "ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "unipc")
"""What a request names as `scheduler` (None: the model's own)."""


@dataclass
class LoadConfig:
    """One load run."""

    queue_max: int = 16
    clients: int | None = None
    """Concurrent clients; None = 2 * queue_max."""
    duration_s: float = 60.0
    max_requests: int = 3000
    sync_share: float = 0.25
    """Share of the text-to-image requests that wait for their image (200); the rest are asynchronous (202)."""
    edit_share: float = 0.25
    """Share of requests that edit an uploaded image (image-to-image or inpainting)."""
    stream_share: float = 0.1
    """Share of requests that stream OpenAI's partial images."""
    backoff_s: float = 0.1
    """Pause of a client after a 429 before its next request."""
    size: int = 16
    steps: int = 4
    max_batch: int = 4
    drain_timeout_s: float = 300.0
    sample_interval_s: float = 0.5

    @property
    def concurrency(self) -> int:
        return self.clients or 2 * self.queue_max


@dataclass
class Answer:
    status: int
    latency_s: float
    kind: str
    """"sync", "async", "edit" (multipart /generate, async), "openai-edit" (/v1/images/edits) or "stream"."""
    job_id: str | None = None
    retry_after: str | None = None


@dataclass
class MemorySeries:
    """Samples of resident memory (bytes) per process name, of Redis' used_memory and of the queue depth (entries
    in the jobs stream: jobs queued or running)."""

    rss: dict[str, list[int]] = field(default_factory=dict)
    redis_used: list[int] = field(default_factory=list)
    queue_depth: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """Start, peak and end in MiB per series."""
        series = {f"{name}_rss": values for name, values in self.rss.items()} | {"redis_used_memory": self.redis_used}
        mib = 2**20
        return {name: {"start_mib": values[0] / mib, "peak_mib": max(values) / mib, "end_mib": values[-1] / mib}
                for name, values in series.items() if values}


class MemorySampler:
    """Samples in a background thread while the load runs (psutil RSS of the children, Redis INFO memory, XLEN of
    the jobs stream)."""

    def __init__(self, processes: ServiceProcesses, redis_url: str, interval_s: float) -> None:
        self.pids = {name: process.pid for name, process in processes.processes().items()}
        self.stream = keys.jobs_stream(processes.model)
        self.redis_url = redis_url
        self.interval_s = interval_s
        self.series = MemorySeries(rss={name: [] for name in self.pids})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, client: redis.Redis) -> None:
        for name, pid in self.pids.items():
            try:
                self.series.rss[name].append(psutil.Process(pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        self.series.redis_used.append(int(client.info("memory")["used_memory"]))
        self.series.queue_depth.append(client.xlen(self.stream))

    def _run(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            while not self._stop.is_set():
                self._sample(client)
                self._stop.wait(self.interval_s)
            self._sample(client)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _request(kind: str, seed: int, sampler: str | None, config: LoadConfig) -> tuple[str, dict]:
    """(path, httpx keyword arguments) of one request of `kind`."""
    size = config.size
    fields = {"prompt": "a red square", "steps": config.steps, "seed": seed} | ({"scheduler": sampler} if sampler else {})
    if kind in ("sync", "async"):
        return "/generate", {"json": fields | {"width": size, "height": size, "async": kind == "async"}}
    if kind == "stream":
        return "/v1/images/generations", {"json": fields | {"size": f"{size}x{size}", "stream": True,
                                                            "partial_images": 1}}
    photo = Image.new("RGB", (size, size), (40 + seed % 200, 120, 200))
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (size // 2, 0, size, size))  # redraw the transparent half
    files = {"image" if kind == "openai-edit" else "init_image": ("photo.png", _png(photo), "image/png")}
    if seed % 2:
        files["mask"] = ("mask.png", _png(mask), "image/png")
    if kind == "openai-edit":
        return "/v1/images/edits", {"data": {k: str(v) for k, v in fields.items()} | {"size": f"{size}x{size}"},
                                    "files": files}
    data = {k: str(v) for k, v in fields.items()} | {"width": str(size), "height": str(size), "async": "true"}
    return "/generate", {"data": data, "files": files}


def _kind(chooser: random.Random, config: LoadConfig) -> str:
    draw = chooser.random()
    if draw < config.stream_share:
        return "stream"
    if draw < config.stream_share + config.edit_share:
        return chooser.choice(["edit", "openai-edit"])
    return "sync" if chooser.random() < config.sync_share else "async"


async def drive(base_url: str, config: LoadConfig) -> tuple[list[Answer], float]:
    """Send requests from `config.concurrency` clients until the count or time limit; the answers and the seconds
    the load lasted."""
    answers: list[Answer] = []
    deadline = time.monotonic() + config.duration_s
    sent = 0
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    started = time.monotonic()
    with tqdm(total=config.max_requests, desc="load", unit="req") as bar:
        async with httpx.AsyncClient(base_url=base_url, timeout=config.drain_timeout_s, limits=limits) as client:

            async def one_client(index: int) -> None:
                nonlocal sent
                chooser = random.Random(index)
                while sent < config.max_requests and time.monotonic() < deadline:
                    sent += 1
                    kind = _kind(chooser, config)
                    path, request = _request(kind, sent, chooser.choice(SAMPLERS), config)
                    request_started = time.perf_counter()
                    response = await client.post(path, **request)  # a stream is read to its end
                    answer = Answer(status=response.status_code, latency_s=time.perf_counter() - request_started,
                                    kind=kind, retry_after=response.headers.get("retry-after"))
                    if response.status_code == 202:
                        answer.job_id = response.json()["id"]
                    elif response.status_code == 200:
                        answer.job_id = response.headers.get("x-job-id")
                        if kind == "stream" and '"image_generation.completed"' not in response.text:
                            answer.status = -1  # a stream that did not end with its image: a bad answer
                    answers.append(answer)
                    bar.update(1)
                    if response.status_code == 429:
                        bar.set_postfix_str(f"429 share {sum(a.status == 429 for a in answers) / len(answers):.0%}",
                                            refresh=False)
                        await asyncio.sleep(config.backoff_s)

            await asyncio.gather(*(one_client(index) for index in range(config.concurrency)))
    return answers, time.monotonic() - started


async def final_states(base_url: str, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Poll every job until it ended or `timeout_s` passed; job id -> last status seen ("missing" on 404)."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        with tqdm(total=len(job_ids), desc="drain", unit="job") as bar:
            while True:
                open_ids = [job_id for job_id in job_ids if states.get(job_id) not in ENDED]
                for job_id in open_ids:
                    response = await client.get(f"/jobs/{job_id}")
                    states[job_id] = response.json()["status"] if response.status_code == 200 else "missing"
                    bar.update(states[job_id] in ENDED)
                if all(status in ENDED for status in states.values()) or time.monotonic() > deadline:
                    return states
                await asyncio.sleep(0.5)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 (seconds) of `values`; empty -> {}."""
    if len(values) < 2:
        return {"p50": values[0], "p95": values[0], "p99": values[0]} if values else {}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}


def summarize(answers: list[Answer], seconds: float, states: dict[str, str], memory: MemorySeries) -> dict:
    """The figures of a run (see the module docstring)."""
    bad = [a for a in answers if a.status not in (200, 202, 429) or (a.status == 429 and not a.retry_after)]
    outcomes = Counter(states.values())
    by_status: dict[str, list[float]] = {}
    for answer in answers:
        by_status.setdefault(str(answer.status), []).append(answer.latency_s)
    return {
        "requests": len(answers), "seconds": seconds, "requests_per_s": len(answers) / seconds,
        "answers": dict(Counter(str(a.status) for a in answers)),
        "answers_by_kind": {kind: dict(Counter(str(a.status) for a in answers if a.kind == kind))
                            for kind in sorted({a.kind for a in answers})},
        "share_429": sum(a.status == 429 for a in answers) / max(len(answers), 1),
        "bad_answers": len(bad), "bad_examples": [asdict(a) for a in bad[:5]],
        "latency_s": percentiles([a.latency_s for a in answers]),
        "latency_s_by_status": {status: percentiles(values) for status, values in by_status.items()},
        "jobs_accepted": len(states), "job_outcomes": dict(outcomes),
        "jobs_lost": sum(status not in ENDED for status in states.values()),
        "memory": memory.summary(), "queue_depth_peak": max(memory.queue_depth, default=0),
    }


def run_load(model_dir: Path, work_dir: Path, config: LoadConfig) -> dict:
    """Start Redis, the API and two workers under `work_dir`, drive them, check every job, stop them; the figures.

    Args:
        model_dir (`Path`): diffusers model directory (served unquantized).
        work_dir (`Path`): Redis data and process logs.
        config (`LoadConfig`): bounds and shape of the load.

    Returns:
        `dict`: see `summarize`, plus the configuration and the load average.
    """
    redis_server = RedisServer(work_dir / "redis", appendonly=True)
    (work_dir / "redis").mkdir(parents=True, exist_ok=True)
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    redis_server.start()
    processes = ServiceProcesses(model_dir, redis_server.url, work_dir / "logs", {
        "queue_max": config.queue_max, "max_batch": config.max_batch, "batch_window_s": 0.05,
        "request_timeout_s": config.drain_timeout_s, "max_num_images": 1, "preview_every_steps": 2,
    })
    try:
        processes.start_api()
        for name in WORKER_NAMES:
            processes.start_worker(name)
        processes.wait_ready(set(WORKER_NAMES))
        with MemorySampler(processes, redis_server.url, config.sample_interval_s) as sampler:
            answers, seconds = asyncio.run(drive(processes.base_url, config))
            job_ids = [answer.job_id for answer in answers if answer.job_id]
            states = asyncio.run(final_states(processes.base_url, job_ids, config.drain_timeout_s))
        results = summarize(answers, seconds, states, sampler.series)
    finally:
        processes.stop()
        redis_server.stop()
    return {"config": asdict(config) | {"clients": config.concurrency}, **results, "load_average": load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="diffusers model dir (default: the tests' tiny random model)")
    defaults = LoadConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value) if value is not None else int, default=value)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    config = LoadConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    with tempfile.TemporaryDirectory(prefix="dgq-load-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from tiny_models import build_tiny_sd

            model_dir = build_tiny_sd(Path(tmp) / "tiny-sd")
        results = run_load(model_dir, Path(tmp), config)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["bad_answers"] == 0 and results["jobs_lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
