"""LoRA side branches on a DGQ UNet: their cost per UNet call, and a batch mixing a LoRA request with a plain one run
per row (one call) or grouped by adapter set (one call per group).

The UNet is diffusers' default `UNet2DConditionModel` config (the SD v1.5 architecture) at random init, quantized
W8A8 with DGQ as bench/bench_unet.py does it (activation groups calibrated on one call at 256 px, min-max weight
ranges), batch-invariant and in exec mode "auto" as the service runs it. The adapter is a random rank-16 LoRA on
every attention projection (to_q, to_k, to_v, to_out.0: the targets of diffusers' LoRA training script), with both
factors non-zero. The UNet computes the cross-attention keys and values itself here; the service precomputes them
per prompt, so their branches run once per request there instead of once per call.

Variants, timed interleaved (one call of each per round; medians):
    plain, batch 2: one request with classifier-free guidance, no adapter.
    LoRA r16, batch 2: the same request with the adapter on both rows.
    per row, batch 4: a LoRA request and a plain one in one call (rows [LoRA, plain, LoRA, plain]).
    grouped, 2 x batch 2: the same two requests as two calls, one per adapter set.

Usage:
    flock /tmp/dgq-bench.lock .venv/bin/python bench/bench_lora.py --out runs/bench_lora.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import build_unet, calibrate_one_call, quant_config, quantized_copy, unet_inputs  # noqa: E402
from common import machine, median, time_interleaved  # noqa: E402

import dgq_core  # noqa: E402
from dgq_core.lora import LoRA, LoRALayer  # noqa: E402

RANK = 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(unet: torch.nn.Module, rank: int = RANK, seed: int = 0) -> LoRA:
    """A rank-`rank` adapter on every attention projection of `unet` (float shapes read off its quantized layers)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGETS) and hasattr(module, "weight_q"):
            out_features, in_features = module.weight_q.shape
            layers[name] = LoRALayer(torch.randn(rank, in_features, generator=generator) * 0.02,
                                     torch.randn(out_features, rank, generator=generator) * 0.02, float(rank))
    return LoRA("bench", layers, "peft")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--groups", type=int, default=8, help="DGQ activation groups K")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_lora.json"), help="results JSON")
    args = parser.parse_args()

    fp32 = build_unet()
    inputs = unet_inputs(fp32)
    calibrated, stats = calibrate_one_call(fp32, quant_config(8, args.groups), inputs)
    unet = quantized_copy(fp32, calibrated, stats)
    del fp32
    dgq_core.make_batch_invariant(unet)
    dgq_core.set_exec_mode(unet, "auto")
    lora = random_lora(unet)
    pair = unet_inputs(unet, batch=4)  # two requests with guidance: [negative A, negative B, prompt A, prompt B]
    mixed_rows = [[(lora, 1.0)], [], [(lora, 1.0)], []]
    halves = {name: pair[name][[0, 2]] if name != "timestep" else pair[name]
              for name in ("sample", "timestep", "encoder_hidden_states")}
    others = {name: pair[name][[1, 3]] if name != "timestep" else pair[name]
              for name in ("sample", "timestep", "encoder_hidden_states")}
    outputs: dict[str, torch.Tensor] = {}

    def plain() -> None:
        outputs["plain"] = unet(**inputs).sample

    def with_lora() -> None:
        with dgq_core.use_loras(unet, [[(lora, 1.0)]] * 2):
            outputs["lora"] = unet(**inputs).sample

    def per_row() -> None:
        with dgq_core.use_loras(unet, mixed_rows):
            outputs["per_row"] = unet(**pair).sample

    def grouped() -> None:
        with dgq_core.use_loras(unet, [[(lora, 1.0)]] * 2):
            adapted = unet(**halves).sample
        outputs["grouped"] = torch.cat((adapted, unet(**others).sample))

    variants = {"plain, batch 2": plain, f"LoRA r{RANK}, batch 2": with_lora, "per row, batch 4": per_row,
                "grouped, 2 x batch 2": grouped}
    times = time_interleaved(variants, args.repeats, args.warmup)
    medians = {name: median(values) for name, values in times.items()}
    # the same rows either way: per-row rows [0, 2] are the adapted half, [1, 3] the plain one
    same_rows = torch.equal(outputs["per_row"][[0, 2]], outputs["grouped"][:2]) and torch.equal(
        outputs["per_row"][[1, 3]], outputs["grouped"][2:])
    results = {
        "machine": machine(),
        "unet": "diffusers UNet2DConditionModel() default config (SD v1.5 architecture), random init, DGQ W8A8 "
                f"K={args.groups}, exec mode auto, batch-invariant, 256 px (32x32 latents), 77 tokens",
        "lora": f"rank {RANK} on {', '.join(TARGETS)} ({len(lora.layers)} layers, {lora.nbytes / 2**20:.1f} MiB)",
        "seconds": times,
        "median_s": medians,
        "side_branch_overhead": medians[f"LoRA r{RANK}, batch 2"] / medians["plain, batch 2"] - 1,
        "per_row_vs_grouped": medians["per row, batch 4"] / medians["grouped, 2 x batch 2"],
        "per_row_equals_grouped": same_rows,
        "lora_changes_output": not torch.equal(outputs["lora"], outputs["plain"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({key: value for key, value in results.items() if key != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
