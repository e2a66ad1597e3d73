"""Every Prometheus metric of the service, defined once (API and workers each export their own `/metrics`). What
belongs to one served model carries its name in the `model` label."""

from __future__ import annotations

import psutil
import torch
from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

REQUEST_LATENCY = Histogram(
    "dgq_http_request_duration_seconds", "HTTP request latency.", ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram("dgq_queue_wait_seconds", "Time from submission until a worker starts the job.", ["model"],
                       buckets=_LATENCY_BUCKETS)
TEXT_ENCODE = Histogram("dgq_text_encode_seconds", "Text encoding + prompt-specific parameters of one request.",
                        ["model"], buckets=_LATENCY_BUCKETS)
DENOISE = Histogram("dgq_denoise_seconds", "Denoising loop of one batch.", ["model"], buckets=_LATENCY_BUCKETS)
DENOISE_STEP = Histogram("dgq_denoise_step_seconds", "One denoising step of one batch.", ["model"],
                         buckets=_STEP_BUCKETS)
DECODE = Histogram("dgq_decode_seconds", "VAE decode + PNG encoding of one batch.", ["model"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("dgq_batch_size_images", "Images per denoising loop.", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
PROMPT_CACHE = Counter("dgq_prompt_cache_total", "Prompt-encoding cache lookups.", ["model", "result"])
JOBS_SUBMITTED = Counter(
    "dgq_jobs_submitted_total", "Jobs accepted, by model, mode (text, image, inpaint) and sampler.",
    ["model", "mode", "scheduler"],
)
PREVIEW_DECODE = Histogram("dgq_preview_decode_seconds", "Decoding and PNG-encoding one preview image.", ["model"],
                           buckets=_STEP_BUCKETS)

QUEUE_DEPTH = Gauge("dgq_queue_depth_jobs", "Jobs queued or running (not yet acknowledged).", ["model"])
CONSUMER_LAG = Gauge("dgq_queue_consumer_lag_jobs", "Jobs not yet delivered to any worker.", ["model"])
LIVE_WORKERS = Gauge("dgq_live_workers", "Workers with a fresh heartbeat.", ["model"])
JOBS = Counter("dgq_jobs_total", "Jobs by how they ended.", ["model", "outcome"])
JOBS_RECLAIMED = Counter("dgq_jobs_reclaimed_total", "Jobs taken over from dead workers.", ["model"])
JOBS_DEAD_LETTERED = Counter("dgq_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream.", ["model"])

MODEL_WEIGHT_BYTES = Gauge("dgq_model_weight_bytes", "Resident model weights (a text encoder two models share is "
                           "counted for the first).", ["model", "component", "precision"])
MODEL_LOAD = Gauge("dgq_model_load_seconds", "Time to load (and warm up) a model in this process.", ["model", "stage"])
MODEL_INFO = Info("dgq_model", "A served model: its checkpoint and quantization.", ["model"])


PROCESS_RSS = Gauge("dgq_process_resident_memory_bytes", "Resident memory of this process.")
PROCESS_RSS.set_function(lambda: psutil.Process().memory_info().rss)
CUDA_ALLOCATED = Gauge("dgq_cuda_memory_allocated_bytes", "CUDA memory allocated by torch (0 without a GPU).")
CUDA_ALLOCATED.set_function(lambda: torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
CUDA_PEAK = Gauge("dgq_cuda_memory_peak_bytes", "Peak CUDA memory allocated by torch (0 without a GPU).")
CUDA_PEAK.set_function(lambda: torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
CUDA_TOTAL = Gauge("dgq_cuda_memory_total_bytes", "Memory of the current CUDA device (0 without a GPU).")
CUDA_TOTAL.set_function(
    lambda: torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if torch.cuda.is_available() else 0
)


def register_model(model: str) -> None:
    """Export a served model's series from the start, at zero: a labelled series exists only once used, and a
    counter that appears with its first increment hides that increment from `rate()` and `increase()`."""
    for metric in (QUEUE_WAIT, TEXT_ENCODE, DENOISE, DENOISE_STEP, DECODE, BATCH_SIZE, PREVIEW_DECODE, QUEUE_DEPTH,
                   CONSUMER_LAG, LIVE_WORKERS, JOBS_RECLAIMED, JOBS_DEAD_LETTERED):
        metric.labels(model=model)
    for outcome in ("succeeded", "failed", "cancelled"):
        JOBS.labels(model=model, outcome=outcome)
    for result in ("hit", "miss"):
        PROMPT_CACHE.labels(model=model, result=result)

