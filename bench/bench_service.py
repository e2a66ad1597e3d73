"""Service benchmark: latency of `POST /generate` against calling the pipeline directly (the service's overhead),
and throughput of batch-4 against batch-1 serving (cross-request batching).

Both are measured side by side in one run, interleaved round by round, medians reported:

- overhead: one image per request. "direct" = `load_pipeline(...)(prompt=..., generator=...)` with text encoding
  in the same call; "service" = real HTTP to a uvicorn server in embedded mode (in-process queue + worker) with
  `max_batch=1` (a lone request on a `max_batch>1` server also waits up to `batch_window_s` for company).
  Each round uses a new prompt, so the service's prompt cache does not help it.
- batching: 4 concurrent requests against a server with `max_batch=4` (window `--batch-window`) and one with
  `max_batch=1`; the batch sizes the batch-4 server actually formed are read back from the jobs' timings.

    .venv/bin/python bench/bench_service.py --model <diffusers dir> [--quantized <checkpoint>] --size 64 --steps 20
    .venv/bin/python bench/bench_service.py --quantized auto --exec-mode int --device cuda    # on a GPU

The memory metrics the batch-4 server exposes (`/metrics`: CUDA memory allocated, peak and total; process RSS) are
recorded too.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dgq_core  # noqa: E402
from bench.common import load_average, median, time_interleaved  # noqa: E402
from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.served_model import quantized_checkpoint  # noqa: E402

PROMPTS = ["a red circle on a blue background", "two green squares", "a yellow triangle above a purple star"]


class ServerThread:
    """A uvicorn server running the service app in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="diffusers model dir (default: the bundled model)")
    parser.add_argument("--quantized", default="none", help="quantized checkpoint dir, 'auto' or 'none'")
    parser.add_argument("--exec-mode", default="fake", choices=("fake", "int"))
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline and workers, e.g. cuda")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-window", type=float, default=0.25, help="batch window of the batch-4 server (s)")
    parser.add_argument("--port", type=int, default=8471, help="first of the two ports the servers use")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = dict(model=args.model, quantized=args.quantized, exec_mode=args.exec_mode, device=args.device,
                warmup_steps=2, request_timeout_s=3600, default_width=args.size, default_height=args.size)
    body = {"width": args.size, "height": args.size, "steps": args.steps, "guidance_scale": 7.5}

    reference = Settings(**base)
    model_ref = reference.served_models[reference.default_model].model_ref
    pipe = dgq_core.from_pretrained(
        model_ref, quantized=quantized_checkpoint(reference), exec_mode=args.exec_mode, device=args.device
    )
    rounds = iter(range(10**9))

    def direct() -> None:
        n = next(rounds)
        pipe(prompt=f"{PROMPTS[n % 3]} {n}", negative_prompt="", width=args.size, height=args.size,
             num_inference_steps=args.steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(n))

    results: dict[str, object] = {
        "model": str(model_ref), "quantized": args.quantized, "exec_mode": args.exec_mode,
        "device": args.device, "size": args.size, "steps": args.steps, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "int_execution": dgq_core.int_execution_summary(pipe.unet),
    }
    with ServerThread(Settings(**base, port=args.port, max_batch=4, batch_window_s=args.batch_window)) as batch4, \
            ServerThread(Settings(**base, port=args.port + 1, max_batch=1)) as batch1:
        client = httpx.Client(timeout=3600)

        def service() -> None:
            n = next(rounds)
            response = client.post(f"{batch1.base_url}/generate", json=body | {"prompt": f"{PROMPTS[n % 3]} {n}",
                                                                               "seed": n})
            response.raise_for_status()

        latency = time_interleaved({"direct": direct, "service": service}, repeats=args.repeats, warmup=args.warmup)
        results["latency_s"] = {name: median(times) for name, times in latency.items()}
        results["overhead_s"] = results["latency_s"]["service"] - results["latency_s"]["direct"]
        results["overhead_ratio"] = results["latency_s"]["service"] / results["latency_s"]["direct"]

        pool = ThreadPoolExecutor(max_workers=4)

        batch4_job_ids: list[str] = []

        def four_concurrent(server: ServerThread) -> None:
            n = next(rounds)
            requests = [body | {"prompt": f"{PROMPTS[i % 3]} {n}", "seed": n + i} for i in range(4)]
            for response in pool.map(lambda r: client.post(f"{server.base_url}/generate", json=r), requests):
                response.raise_for_status()
                if server is batch4:
                    batch4_job_ids.append(response.headers["x-job-id"])

        batching = time_interleaved({"batch4": lambda: four_concurrent(batch4),
                                     "batch1": lambda: four_concurrent(batch1)}, repeats=args.repeats,
                                    warmup=args.warmup)
        results["four_requests_s"] = {name: median(times) for name, times in batching.items()}
        results["images_per_s"] = {name: 4 / seconds for name, seconds in results["four_requests_s"].items()}
        results["batch4_speedup"] = results["four_requests_s"]["batch1"] / results["four_requests_s"]["batch4"]
        batch_sizes = [client.get(f"{batch4.base_url}/jobs/{job_id}").json()["timings"]["batch_images"]
                       for job_id in batch4_job_ids]
        results["batch4_mean_images_per_batch"] = sum(batch_sizes) / len(batch_sizes)
        metrics = client.get(f"{batch4.base_url}/metrics").text
        results["memory_metrics"] = {
            line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith(("dgq_cuda_memory", "dgq_process_resident_memory_bytes"))
        }  # fmt: skip
    results["load_average"] = load_average()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
