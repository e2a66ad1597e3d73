"""PSNR of DGQ (K=8, K=16) against both baselines at W8A8, W4A8, W8A6, W4A6, and calibration cost.

Two networks:
- the real pretrained TAESD decoder (service/assets/taesd): PSNR of the quantized decode against the
  full-precision decode of real photographs (calibrated on 14 other photographs, flipped and transposed);
- a tiny random-init SD-architecture pipeline: PSNR of quantized images against full-precision images, same seeds
  (calibrated on the 8 TINY_PROMPTS, evaluated on 4 others).

Run: .venv/bin/python bench/bench_core_psnr.py [--json OUT] [--parts taesd,tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dgq_core.calibration import collect_module_stats, collect_unet_stats, quantize_from_stats  # noqa: E402
from dgq_core.config import DGQConfig  # noqa: E402

SETTINGS = [(8, 8), (4, 8), (8, 6), (4, 6)]
METHODS = [("dgq", 8), ("dgq", 16), ("pertensor", 1), ("dynamic", 1)]
# The tiny SD pipeline has attention (TAESD has none): there DGQ K=8 with uniform attention-probability codes too.
UNIFORM_PROBS = ("dgq uniform probs", 8)
TINY_PROMPTS = ["a red circle", "a blue square on green", "small yellow triangle", "big purple star",
                "two circles", "an orange square", "a grey triangle above a circle", "a pink star"]


def psnr_np(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1 / float(((a - b) ** 2).mean()))


def taesd_table() -> dict:
    import test_taesd as taesd

    model = taesd.load_taesd()
    with torch.no_grad():
        calibration = torch.cat([
            torch.cat([z, z.flip(-1), z.flip(-2), z.transpose(-1, -2)])
            for z in map(model.encoder, map(taesd.photo, taesd.CALIBRATION_IMAGES))
        ])
        evaluation = {n: model.encoder(taesd.photo(n)) for n in taesd.EVALUATION_IMAGES}
        reference = {n: model.decoder(z) for n, z in evaluation.items()}
    decoder = model.decoder
    collector, state = collect_module_stats(
        decoder, DGQConfig(excluded_layers=[]),
        lambda: [decoder(calibration[i: i + 8]) for i in range(0, len(calibration), 8)], (taesd.SIZE // 8,) * 2,
    )
    table = {}
    for (w_bits, a_bits), (method, groups) in tqdm([(s, m) for s in SETTINGS for m in METHODS], desc="TAESD"):
        quantized = copy.deepcopy(decoder)
        config = DGQConfig(method=method, w_bits=w_bits, a_bits=a_bits, groups=groups, excluded_layers=[])
        quantize_from_stats(quantized, config, collector, state)
        with torch.no_grad():
            value = np.mean([taesd.psnr(quantized(evaluation[n]), reference[n]) for n in taesd.EVALUATION_IMAGES])
        table[f"W{w_bits}A{a_bits} {method} K={groups}"] = round(float(value), 2)
    return table


def tiny_sd_table(steps: int) -> tuple[dict, dict]:
    """PSNR of every setting on the tiny SD pipeline, and the seconds of its two statistics runs.

    One statistics run serves every bit width and K (DGQ records attention without the start column, so DGQ and the
    baselines get one run each), as `dgq_eval.benchmark` does.
    """
    from diffusers import StableDiffusionPipeline
    from tiny_models import build_tiny_sd

    model_dir = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")

    def load():
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(pipe):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(4)]
        return pipe(["a red circle", "two blue squares", "a green star", "a yellow triangle"],
                    num_inference_steps=steps, generator=generators, output_type="np").images

    reference = images(load())
    calibrations = {
        family: collect_unet_stats(load(), DGQConfig(method=family, steps=steps), TINY_PROMPTS, progress=False)
        for family in ("dgq", "pertensor")
    }
    table = {}
    rows = [(s, m) for s in SETTINGS for m in [*METHODS, UNIFORM_PROBS]]
    for (w_bits, a_bits), (name, groups) in tqdm(rows, desc="tiny SD"):
        pipe = load()
        method = name.split()[0]
        config = DGQConfig(method=method, w_bits=w_bits, a_bits=a_bits, groups=groups, steps=steps,
                           prob_quantizer="uniform" if name == UNIFORM_PROBS[0] else "log2")  # fmt: skip
        calibrations["dgq" if method == "dgq" else "pertensor"].quantize(pipe.unet, config)
        table[f"W{w_bits}A{a_bits} {name} K={groups}"] = round(psnr_np(images(pipe), reference), 2)
    seconds = {f"statistics run ({family})": round(c.seconds, 1) for family, c in calibrations.items()}
    return table, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results_core_psnr.json"))
    parser.add_argument("--tiny-steps", type=int, default=4, help="sampler steps of the tiny-model runs")
    parser.add_argument("--parts", default="taesd,tiny", help="which tables to (re)measure; others stay in --json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    started = time.perf_counter()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if "taesd" in parts:
        results["taesd_decoder_psnr_db"] = taesd_table()
        args.json.write_text(json.dumps(results, indent=2))  # written as each part ends: the runs are long on a CPU
    if "tiny" in parts:
        results["tiny_sd_psnr_db"], results["tiny_sd_calibration_seconds"] = tiny_sd_table(args.tiny_steps)
    results["seconds_of_the_last_run"] = round(time.perf_counter() - started, 1)
    args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
