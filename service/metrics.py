"""Every Prometheus metric of the service, defined once (API and workers each export their own `/metrics`)."""

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
QUEUE_WAIT = Histogram("dgq_queue_wait_seconds", "Time from submission until a worker starts the job.",
                       buckets=_LATENCY_BUCKETS)
TEXT_ENCODE = Histogram("dgq_text_encode_seconds", "Text encoding + prompt-specific parameters of one request.",
                        buckets=_LATENCY_BUCKETS)
DENOISE = Histogram("dgq_denoise_seconds", "Denoising loop of one batch.", buckets=_LATENCY_BUCKETS)
DENOISE_STEP = Histogram("dgq_denoise_step_seconds", "One denoising step of one batch.", buckets=_STEP_BUCKETS)
DECODE = Histogram("dgq_decode_seconds", "VAE decode + PNG encoding of one batch.", buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("dgq_batch_size_images", "Images per denoising loop.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
PROMPT_CACHE = Counter("dgq_prompt_cache_total", "Prompt-encoding cache lookups.", ["result"])
JOBS_SUBMITTED = Counter(
    "dgq_jobs_submitted_total", "Jobs accepted, by mode (text, image, inpaint) and sampler.", ["mode", "scheduler"]
)
PREVIEW_DECODE = Histogram("dgq_preview_decode_seconds", "Decoding and PNG-encoding one preview image.",
                           buckets=_STEP_BUCKETS)

QUEUE_DEPTH = Gauge("dgq_queue_depth_jobs", "Jobs queued or running (not yet acknowledged).")
CONSUMER_LAG = Gauge("dgq_queue_consumer_lag_jobs", "Jobs not yet delivered to any worker.")
LIVE_WORKERS = Gauge("dgq_live_workers", "Workers with a fresh heartbeat.")
JOBS = Counter("dgq_jobs_total", "Jobs by how they ended.", ["outcome"])
JOBS_RECLAIMED = Counter("dgq_jobs_reclaimed_total", "Jobs taken over from dead workers.")
JOBS_DEAD_LETTERED = Counter("dgq_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream.")

MODEL_WEIGHT_BYTES = Gauge("dgq_model_weight_bytes", "Resident model weights.", ["component", "precision"])
MODEL_LOAD = Gauge("dgq_model_load_seconds", "Time to load (and warm up) the model in this process.", ["stage"])
MODEL_INFO = Info("dgq_model", "The served model.")
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
