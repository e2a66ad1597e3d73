"""What every benchmark here needs: interleaved repeated timing with medians (peak memory: dgq_core.memory).

Ratios are only meaningful when measured side by side in one run on the same (possibly shared) machine, so
`time_interleaved` runs one call of every variant per round, round after round, and reports medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm


def time_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, with variants interleaved within each round.

    Args:
        variants (`dict[str, Callable]`): name -> a zero-argument call to time.
        repeats (`int`): timed rounds.
        warmup (`int`): untimed rounds first (first-call costs: allocator growth, lazily built kernel plans).

    Returns:
        `dict[str, list[float]]`: every timed call's seconds, per variant.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tqdm(total=(warmup + repeats) * len(variants), desc="timing", unit="call") as bar:
        for round_index in range(warmup + repeats):
            for name, call in variants.items():
                started = time.perf_counter()
                call()
                elapsed = time.perf_counter() - started
                if round_index >= warmup:
                    times[name].append(elapsed)
                bar.set_postfix_str(name)
                bar.update(1)
    return times


def synchronized(device, call: Callable) -> Callable:
    """`call`, waiting for the device's queued work before it returns (a CUDA call returns before its kernels end)."""

    def run():
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def median(values: list[float]) -> float:
    return statistics.median(values)


# CPU features that decide which integer kernels run and how fast: int8 dot products with int32 accumulation
# (VNNI) and tile matrix multiplies (AMX); without them oneDNN's int8 products saturate in int16.
CPU_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "amx_int8")
# bf16 arithmetic, which OpenVINO's default precision hint uses where the CPU has it (bench/bench_cpu_peers.py).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    """What the figures were measured on: CPU model and int8 features, torch threads and version, load average."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", "unknown"),
        "cpu_int8_features": [flag for flag in CPU_FLAGS if flag in flags],
        "cpu_bf16_features": [flag for flag in BF16_FLAGS if flag in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_after": load_average(),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages, recorded with results because the machine is shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
