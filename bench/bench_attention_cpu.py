"""DGQ attention on the CPU at the shapes of SD v1.5: the C kernel (`kernels.cpu_attention`, what exec modes "int"
and "auto" run on CPUs with AVX-512) against the reference processor (FP32 scores materialized, six passes of torch
ops over them) and PyTorch's FP32 SDPA (what the FP32 UNet runs, unquantized).

Shapes: every attention of bench/bench_unet.py's UNet call (256 px, batch 2: 32x32, 16x16 and 8x8 latents, self and
cross), and SD's first level at 512 px (64x64 latents), whose exponentials exceed the default 256 MiB budget for
all but a few (sample, head) planes, so that most are computed twice. The kernel runs with the processor's default
budget and with none (every plane computed twice). Times are medians of interleaved calls; agreement is the largest
difference from the reference's output over its largest value (the same codes give about 1e-6; a code that flips
at a tie moves its row more).

    .venv/bin/python bench/bench_attention_cpu.py --out runs/bench_attention_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention_cuda import REFERENCE, compare_calls, markdown, reference_processor  # noqa: E402
from common import machine  # noqa: E402

from dgq_core.kernels import cpu_attention  # noqa: E402

# (name, CFG rows, heads, queries, keys, head dim)
SHAPES = [
    ("sd15 32x32 self", 2, 8, 1024, 1024, 40),
    ("sd15 32x32 cross", 2, 8, 1024, 77, 40),
    ("sd15 16x16 self", 2, 8, 256, 256, 80),
    ("sd15 16x16 cross", 2, 8, 256, 77, 80),
    ("sd15 8x8 self", 2, 8, 64, 64, 160),
    ("sd15 8x8 cross", 2, 8, 64, 77, 160),
    ("sd15 64x64 self (512 px)", 2, 8, 4096, 4096, 40),
]


@torch.no_grad()
def measure_shape(name, batch, heads, queries, keys, head_dim, repeats, warmup) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    # Q as the processor hands it to the kernel: the heads split from the tokens, a strided view.
    q = torch.randn(batch, queries, heads, head_dim, generator=generator).transpose(1, 2)
    k, v = (torch.randn(batch, heads, keys, head_dim, generator=generator) for _ in range(2))
    keep_start = keys == 77  # cross-attention over a prompt's 77 tokens keeps <start> exact
    scale = head_dim**-0.5
    reference = reference_processor(keep_start)
    kernel = functools.partial(cpu_attention.dgq_attention, q, k, v, scale, 8, "log2", keep_start)
    calls = {
        REFERENCE: lambda: reference._attend(q, k, v, scale, None),
        "cpu kernel": kernel,
        "cpu kernel, exponentials computed twice": functools.partial(kernel, scores_budget_bytes=0),
        "sdpa fp32 (unquantized)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    shape = {"shape": name, "batch": batch, "heads": heads, "queries": queries, "keys": keys, "head_dim": head_dim}
    return compare_calls(torch.device("cpu"), shape, calls, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention_cpu.json"))
    args = parser.parse_args()
    if not cpu_attention.available():
        raise SystemExit("this CPU has no AVX-512 (or no C compiler): the CPU attention kernel does not run here")
    rows = [row for shape in SHAPES for row in measure_shape(*shape, repeats=args.repeats, warmup=args.warmup)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(json.dumps(machine()))
    print(markdown(rows))


if __name__ == "__main__":
    main()
