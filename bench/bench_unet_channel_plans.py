"""What channel-wise groups that change from step to step cost integer execution in resident memory.

A channel-grouped layer runs as one GEMM per group over that group's columns, so its weight is kept sliced by group
(an offline permutation of its columns). Labels calibrated per sampler step need one sliced copy per distinct
labelling; labels shared across steps (only scales per step) need one. This reads a quantized UNet checkpoint
(`dgq quantize` output) and counts, per layer, the distinct channel labellings over the calibrated steps.

Usage:
    .venv/bin/python bench/bench_unet_channel_plans.py --checkpoint runs/quantized/unet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from dgq_core.checkpoint import load_quantized_unet
from dgq_core.layers import QuantConv2d, QuantLinear


def channel_plan_costs(unet) -> dict:
    """Per-step vs shared channel groups: int8 weight bytes each needs, over the model's quantized layers."""
    layers = [(name, m) for name, m in unet.named_modules() if isinstance(m, QuantLinear | QuantConv2d)]
    weight_bytes = per_step = shared = 0
    layers_with_channel_steps = 0
    distinct_counts = []
    for _, layer in tqdm(layers, desc="layers", unit="layer"):
        codes = layer.weight_q.codes
        one_copy = codes.shape[0] * layer.weight_q.in_features  # int8 bytes of the weight
        weight_bytes += one_copy
        act = layer.act
        if act.mode != "group":
            continue
        channel_steps = [s for s in range(act.axis.numel()) if int(act.axis[s]) == 0]
        if not channel_steps:
            continue
        layers_with_channel_steps += 1
        distinct = {act.labels_channel[s].numpy().tobytes() for s in channel_steps}
        distinct_counts.append(len(distinct))
        per_step += len(distinct) * one_copy
        shared += one_copy
    return {
        "quantized_layers": len(layers),
        "layers_with_channel_groups": layers_with_channel_steps,
        "steps": int(max((m.act.axis.numel() for _, m in layers), default=0)),
        "distinct_labellings_per_channel_layer_mean": sum(distinct_counts) / max(len(distinct_counts), 1),
        "int8_weight_bytes": weight_bytes,
        "extra_bytes_per_step_labels": per_step,
        "extra_bytes_shared_labels": shared,
        "extra_ratio_per_step_labels": per_step / max(weight_bytes, 1),
        "extra_ratio_shared_labels": shared / max(weight_bytes, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="quantized UNet directory")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    result = channel_plan_costs(load_quantized_unet(args.checkpoint))
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
