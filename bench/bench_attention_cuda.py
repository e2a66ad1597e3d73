"""DGQ attention on a GPU at the shapes of SD v1.5 and SDXL: the fused Triton kernel (`kernels.triton_attention`,
at each dot precision) against the reference processor (FP32 scores materialized in blocks within its budget) and
FP16 SDPA (what an FP16 UNet runs). Prepared for a lent GPU (`bench/gpu_check.py` runs it): **not yet run on one**.

Times are medians of interleaved calls that wait for the GPU; memory is what one call allocates beyond what is
allocated before it; agreement is the largest difference from the reference's output over its largest value (ties
aside, the same codes give about 1e-6; the kernel's tile loop sums in another order).

    .venv/bin/python bench/bench_attention_cuda.py --out runs/bench_attention_cuda.json
    TRITON_INTERPRET=1 .venv/bin/python bench/bench_attention_cuda.py --device cpu --tiny    # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, synchronized, time_interleaved  # noqa: E402

from dgq_core.attention import DGQAttnProcessor  # noqa: E402
from dgq_core.layers import ActQuantizer  # noqa: E402
from dgq_core.steps import StepState  # noqa: E402

# (name, CFG rows, heads, queries, keys, head dim): SD v1.5 at 512 px (64x64 latents) and SDXL at 1024 px (128x128).
SHAPES = [
    ("sd15 64x64 self, 1 image", 2, 8, 4096, 4096, 40),
    ("sd15 64x64 self, 8 images", 16, 8, 4096, 4096, 40),
    ("sd15 64x64 cross, 8 images", 16, 8, 4096, 77, 40),
    ("sd15 32x32 self, 8 images", 16, 8, 1024, 1024, 80),
    ("sd15 16x16 self, 8 images", 16, 8, 256, 256, 160),
    ("sdxl 64x64 self, 1 image", 2, 10, 4096, 4096, 64),
    ("sdxl 32x32 cross, 1 image", 2, 20, 1024, 77, 64),
]
TINY_SHAPES = [("tiny self", 2, 2, 64, 64, 40), ("tiny cross", 2, 2, 64, 77, 40)]
PRECISIONS = ("tf32x3", "tf32", "ieee")


def reference_processor(keep_start: bool) -> DGQAttnProcessor:
    """DGQ's reference attention (method "dgq", 8 bits, log2 codes); its `_attend` calls no Q/K/V quantizer."""

    def passthrough() -> ActQuantizer:
        return ActQuantizer("qkv", "none", 8, None)

    return DGQAttnProcessor("dgq", 8, keep_start, passthrough(), passthrough(), passthrough(), StepState([1], (8, 8)))



def peak_bytes(device: torch.device, call) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    return torch.cuda.max_memory_allocated(device) - before


@torch.no_grad()
def measure(device: torch.device, shapes: list[tuple], repeats: int, warmup: int = 2) -> list[dict]:
    """A row per (shape, variant): seconds per call, call memory, difference from the reference."""
    return [row for shape in shapes for row in measure_shape(device, *shape, repeats=repeats, warmup=warmup)]


def measure_shape(device, name, batch, heads, queries, keys, head_dim, repeats, warmup) -> list[dict]:
    from dgq_core.kernels.triton_attention import dgq_attention  # here: the CPU benchmark imports this module

    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=generator, device=device) for n in (queries, keys, keys))
    keep_start = keys == 77  # cross-attention over a prompt's 77 tokens keeps <start> exact
    scale = head_dim**-0.5
    reference = reference_processor(keep_start)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    q16, k16, v16 = q.to(half), k.to(half), v.to(half)
    calls = {REFERENCE: lambda: reference._attend(q, k, v, scale, None)}
    # The interpreter computes every dot in FP32 whatever the precision: one of them on CPU.
    for precision in PRECISIONS if device.type == "cuda" else PRECISIONS[:1]:
        calls[f"fused {precision}"] = lambda p=precision: dgq_attention(q, k, v, scale, 8, "log2", keep_start, p)
    calls["sdpa fp16 (unquantized)"] = lambda: F.scaled_dot_product_attention(q16, k16, v16)
    shape = {"shape": name, "batch": batch, "heads": heads, "queries": queries, "keys": keys, "head_dim": head_dim}
    return compare_calls(device, shape, calls, repeats, warmup)


REFERENCE = "reference (fp32, blocked)"


def compare_calls(device, shape: dict, calls: dict, repeats: int, warmup: int) -> list[dict]:
    """A row per variant of one shape (`calls`, the reference's under `REFERENCE`), timed interleaved: seconds per
    call, its ratio to the reference's, call memory (CUDA), difference from the reference's output."""
    calls = {variant: synchronized(device, call) for variant, call in calls.items()}
    outputs = {variant: call().float() for variant, call in calls.items()}
    times = time_interleaved(calls, repeats, warmup)
    expected = outputs[REFERENCE]
    return [
        {
            **shape, "variant": variant, "s_per_call": median(times[variant]),
            "x_reference": median(times[REFERENCE]) / median(times[variant]),
            "call_peak_bytes": peak_bytes(device, call),
            "max_error_vs_reference": float((outputs[variant] - expected).abs().max() / expected.abs().max()),
        }
        for variant, call in calls.items()
    ]  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | variant | ms/call | call peak MiB | max diff vs reference |", "|---|---|---|---|---|"]
    for row in rows:
        peak = "—" if row["call_peak_bytes"] is None else f"{row['call_peak_bytes'] / 2**20:,.0f}"
        lines.append(
            f"| {row['shape']} | {row['variant']} | {row['s_per_call'] * 1e3:.3f} | {peak} | "
            f"{row['max_error_vs_reference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke runs in the interpreter)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention_cuda.json"))
    args = parser.parse_args()
    rows = measure(torch.device(args.device), TINY_SHAPES if args.tiny else SHAPES, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
