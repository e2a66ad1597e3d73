"""Peak memory of one 1024x1024 UNet call of an SD v1.5-architecture DGQ model on CPU: the quantized attention in
blocks of query rows within the scores budget, against the same call unblocked, side by side in one run.

The UNet is diffusers' default `UNet2DConditionModel` config (the SD v1.5 architecture) at random init, quantized
W8A8 with DGQ the way bench/bench_unet.py does it (activation groups calibrated on one call at 256 px, min-max
weight ranges): memory does not depend on the weight values. Each variant runs in a fresh process that loads the
checkpoint (exec mode "auto", as the service runs it), sets the attention budget and makes one UNet call on a
128x128 latent (1024x1024 pixels) with 77 text tokens; it reports its peak RSS (VmHWM), the RSS the model added, the
largest attention-score block it materialized (the reference's scores, or the exponentials the CPU attention
kernel keeps between its passes) and the call's seconds, and writes its output, so that the blocked and
unblocked outputs of the same input are compared.

Variants:
    blocked, batch 2: the request as the service runs it (classifier-free guidance), scores budget 256 MiB.
    blocked, batch 1 / unblocked, batch 1: one half of it, with and without the budget. Unblocked, one call's
        self-attention at 1024 px materializes 8 GiB of scores per sample (16 GiB for the guided pair, which this
        24 GB machine cannot hold beside other work); the unblocked variant is skipped, saying so, when the memory
        available is below what it needs.

Usage:
    flock /tmp/dgq-bench.lock .venv/bin/python bench/bench_attention_memory.py --out runs/attention_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import TOKENS, build_unet, calibrate_one_call, quant_config, quantized_copy, unet_inputs  # noqa: E402
from common import machine  # noqa: E402

import dgq_core  # noqa: E402
from dgq_core import attention  # noqa: E402
from dgq_core.diffusers_quantizer import load_quantized_unet, save_quantized_unet  # noqa: E402
from dgq_core.kernels import cpu_attention  # noqa: E402

SIDE = 1024
LATENT = SIDE // 8
BUDGET_BYTES = attention.DEFAULT_SCORES_BUDGET_BYTES
UNBLOCKED_BYTES = 1 << 62
"""A budget no call reaches: every call materializes its scores whole."""
VARIANTS = {  # name -> (batch, scores budget)
    "blocked, batch 2": (2, BUDGET_BYTES),
    "blocked, batch 1": (1, BUDGET_BYTES),
    "unblocked, batch 1": (1, UNBLOCKED_BYTES),
}
GIB = 1 << 30


@torch.no_grad()
def child(checkpoint: Path, batch: int, budget: int, output: Path) -> None:
    """In this fresh process: load, one 1024 px call, print the figures as JSON, save the output."""
    dgq_core.trim_heap()
    before = psutil.Process().memory_info().rss
    unet = load_quantized_unet(checkpoint)
    dgq_core.set_exec_mode(unet, "auto")
    dgq_core.set_attention_budget(unet, budget)
    dgq_core.trim_heap()
    model_bytes = psutil.Process().memory_info().rss - before
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, unet.config.in_channels, LATENT, LATENT, generator=generator).repeat(batch, 1, 1, 1)
    text = torch.randn(1, TOKENS, unet.config.cross_attention_dim, generator=generator).repeat(batch, 1, 1)
    largest = 0
    materialize = attention._attention_scores

    def recording(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
        nonlocal largest
        scores = materialize(query, key, scale)
        largest = max(largest, scores.numel() * scores.element_size())
        return scores

    keep = cpu_attention.reusable_buffer

    def recording_buffer(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        buffer = keep(name, size, like)
        if name == cpu_attention.EXPONENTIALS_BUFFER:
            largest = max(largest, buffer.numel() * buffer.element_size())
        return buffer

    # Both observe the sizes; the computation is the library's.
    attention._attention_scores = recording
    cpu_attention.reusable_buffer = recording_buffer
    dgq_core.reset_peak_rss()
    started = time.perf_counter()
    out = unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
    seconds = time.perf_counter() - started
    peak = dgq_core.peak_rss_bytes()
    save_file({"sample": out[:1].contiguous()}, str(output))
    print(json.dumps({
        "peak_rss_bytes": peak, "model_rss_bytes": model_bytes, "largest_scores_bytes": largest,
        "footprint_bytes": dgq_core.scores_footprint(unet).bytes(batch, LATENT, LATENT), "call_s": seconds,
        "exec": dgq_core.int_execution_summary(unet),
    }))


def unblocked_need_bytes(model_bytes: int) -> int:
    """What the unblocked batch-1 call needs at least: the model and one self-attention's scores at 1024 px."""
    return model_bytes + 8 * (LATENT * LATENT) ** 2 * 4  # 8 heads x 16384^2 float32 scores: 8 GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/attention_memory.json"))
    parser.add_argument("--checkpoint", type=Path, help="a W8A8 checkpoint an earlier run wrote (skips quantizing)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, batch, budget, output = args.child
        child(Path(checkpoint), int(batch), int(budget), Path(output))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_attention_memory_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        with torch.no_grad(), tqdm(total=2, desc="quantizing SD v1.5 (random init)", unit="stage") as stages:
            fp32 = build_unet()
            config, stats = calibrate_one_call(fp32, quant_config(8, 8), unet_inputs(fp32))
            stages.update(1)
            checkpoint = save_quantized_unet(quantized_copy(fp32, config, stats), workdir / "w8a8")
            del fp32, stats
            stages.update(1)
    results = {"machine": machine(), "side": SIDE, "budget_bytes": BUDGET_BYTES, "variants": {}}
    for name, (batch, budget) in tqdm(VARIANTS.items(), desc="variants", unit="variant"):
        if budget == UNBLOCKED_BYTES:
            model_bytes = results["variants"]["blocked, batch 1"]["model_rss_bytes"]
            available = psutil.virtual_memory().available
            if available < unblocked_need_bytes(model_bytes):
                results["variants"][name] = {"skipped": f"{available / GIB:.1f} GiB available, it needs more than "
                                                        f"{unblocked_need_bytes(model_bytes) / GIB:.1f} GiB"}
                continue
        output = workdir / f"{name.replace(', ', '-').replace(' ', '_')}.safetensors"
        command = [sys.executable, __file__, "--child", str(checkpoint), str(batch), str(budget), str(output)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            results["variants"][name] = {"failed": f"exit {result.returncode}: {result.stderr[-2000:]}"}
            continue
        results["variants"][name] = json.loads(result.stdout.strip().splitlines()[-1]) | {"output": str(output)}
    outputs = {name: load_file(figures["output"])["sample"] for name, figures in results["variants"].items()
               if "output" in figures}
    if {"blocked, batch 1", "unblocked, batch 1"} <= outputs.keys():
        difference = (outputs["blocked, batch 1"] - outputs["unblocked, batch 1"]).abs().max().item()
        results["blocked_vs_unblocked_max_abs_difference"] = difference
    if {"blocked, batch 1", "blocked, batch 2"} <= outputs.keys():
        difference = (outputs["blocked, batch 1"] - outputs["blocked, batch 2"]).abs().max().item()
        results["batch_1_vs_batch_2_max_abs_difference"] = difference
    results["checkpoint"] = str(checkpoint)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
