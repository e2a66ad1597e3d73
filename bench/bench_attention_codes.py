"""Where DGQ loses PSNR against full precision on the bundled model: the log2 codes of self- vs cross-attention.

The method log2-quantizes every attention-probability map, self- and cross-attention alike (reference/dgq-method.md,
2.3). This loads one DGQ checkpoint and swaps the codes of the self-attention maps, the cross-attention maps, or both,
for uniform ones (same per-sample scale, `<start>` still exact) or for base-sqrt(2) log codes `round(-2 log2(p / s))`
(half the log2 step in the same code width: `prob_quantizer="log-sqrt2"`, our proposal, not the method), and scores
each variant against the full-precision images of the same held-out prompts and seeds: PSNR/SSIM vs FP and
prompt alignment.

Usage:
    .venv/bin/python bench/bench_attention_codes.py --num 128 --out runs/attention_codes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from dgq_core.attention import DGQAttnProcessor  # noqa: E402
from dgq_eval import alignment, harness, metrics  # noqa: E402
from dgq_zoo import bundled_model_dir, shapes  # noqa: E402

# The probability codes of each variant (`QuantConfig.prob_quantizer` values): (self-attention, cross-attention).
VARIANTS = {
    "log2 everywhere (the method)": ("log2", "log2"),
    "uniform self-attention, log2 cross-attention": ("uniform", "log2"),
    "log2 self-attention, uniform cross-attention": ("log2", "uniform"),
    "log2 self-attention, log-sqrt2 cross-attention": ("log2", "log-sqrt2"),
    "log-sqrt2 everywhere": ("log-sqrt2", "log-sqrt2"),
    "uniform everywhere": ("uniform", "uniform"),
}


def set_prob_codes(unet: torch.nn.Module, self_codes: str, cross_codes: str) -> None:
    """Give every DGQ attention processor of `unet` the probability codes of its attention kind."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, DGQAttnProcessor):
            processor.prob_quantizer = cross_codes if processor.is_cross else self_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bundled_model_dir()), help="full-precision model")
    parser.add_argument("--checkpoint", default=str(bundled_model_dir()) + "-dgq", help="DGQ checkpoint (log2 codes)")
    parser.add_argument("--num", type=int, default=64, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=harness.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=harness.DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/attention_codes.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prompts = harness.heldout_prompts(args.num)
    scenes = [shapes.parse_prompt(prompt) for prompt in prompts]

    def config(model: str) -> harness.EvalConfig:
        return harness.EvalConfig(model, prompts, args.steps, args.guidance)

    reference, _ = harness.generate(harness.load_model(args.model), config(args.model), desc="full precision")
    pipeline = harness.load_model(args.checkpoint)
    rows = []
    for name, (self_codes, cross_codes) in VARIANTS.items():
        set_prob_codes(pipeline.unet, self_codes, cross_codes)
        images, _ = harness.generate(pipeline, config(args.checkpoint), desc=name)
        rows.append({
            "variant": name,
            "psnr_vs_fp_db": metrics.mean_psnr(images, reference),
            "ssim_vs_fp": metrics.mean_ssim(images, reference),
            "alignment": alignment.score_images(images, scenes).accuracy,
        })
    fp_alignment = alignment.score_images(reference, scenes).accuracy
    result = {
        "command": " ".join(sys.argv), "machine": machine(), "checkpoint": args.checkpoint, "num": args.num,
        "steps": args.steps, "guidance": args.guidance, "fp_alignment": fp_alignment, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"FP alignment {fp_alignment:.1%}")
    print("| variant | PSNR vs FP (dB) | SSIM vs FP | alignment |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['psnr_vs_fp_db']:.2f} | {row['ssim_vs_fp']:.4f} | {row['alignment']:.1%} |")


if __name__ == "__main__":
    main()
