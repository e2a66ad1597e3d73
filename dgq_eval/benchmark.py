"""The quality table of the bundled model: full precision vs DGQ (K=8, K=16) vs the per-tensor and dynamic baselines
at W8A8, W4A8, W8A6 and W4A6, on held-out prompts with fixed seeds.

    python -m dgq_eval.benchmark --out runs/quality --num 64

Calibration statistics are collected once for DGQ and once for the baselines (on the model's own
calibration_prompts.txt, training compositions, the seeded subset `dgq quantize` takes), every setting is
quantized from them and saved as a checkpoint, and each is scored with the evaluation harness against the full-precision images of the same prompts and seeds.
Writes OUT/quality.json and OUT/quality.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dgq_core
from dgq_core import EXEC_MODES, UNetCalibration
from dgq_eval import harness
from dgq_zoo import bundled_model_dir

PRECISIONS = ((8, 8), (4, 8), (8, 6), (4, 6))


# How a DGQ row's attention-probability codes show in its --methods key and in its table label.
_PROB_CODE_NAMES = {"log2": ("", ""), "log-sqrt2": ("sqrt2", " log-sqrt2 probs"), "uniform": ("uniform", " uniform probs")}


@dataclass(frozen=True)
class QuantSetting:
    """One row of the table.

    Args:
        method: "dgq", "pertensor" or "dynamic" (see dgq_core.DGQConfig).
        w_bits: weight bits.
        a_bits: activation bits.
        groups: K for "dgq".
        shared_channel_groups: one channel labelling per layer across steps ("dgq" only; see DGQConfig).
        prob_quantizer: "log2" (the method), "log-sqrt2" or "uniform" attention-probability codes ("dgq" only; see
            DGQConfig).
    """

    method: str
    w_bits: int
    a_bits: int
    groups: int = 16
    shared_channel_groups: bool = False
    prob_quantizer: str = "log2"

    @property
    def key(self) -> str:
        """Its name in --methods: dgq8, dgq16, dgq8shared, dgq8uniform, dgq8sqrt2, dgq16sqrt2, pertensor, dynamic."""
        if self.method != "dgq":
            return self.method
        variant = "shared" if self.shared_channel_groups else _PROB_CODE_NAMES[self.prob_quantizer][0]
        return f"dgq{self.groups}{variant}"

    @property
    def label(self) -> str:
        suffix = f" K={self.groups}" if self.method == "dgq" else ""
        suffix += " shared groups" if self.shared_channel_groups else ""
        suffix += _PROB_CODE_NAMES[self.prob_quantizer][1]
        return f"W{self.w_bits}A{self.a_bits} {self.method}{suffix}"

    @property
    def dirname(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}_{self.key}"


def default_settings(precisions=PRECISIONS) -> list[QuantSetting]:
    """DGQ K=8, DGQ K=16, DGQ K=8 with shared channel groups, DGQ K=8 with uniform attention probabilities, DGQ K=8
    and K=16 with base-sqrt(2) log attention probabilities, and the per-tensor and dynamic baselines, at each
    precision."""
    return [
        setting
        for w_bits, a_bits in precisions
        for setting in (
            QuantSetting("dgq", w_bits, a_bits, 8),
            QuantSetting("dgq", w_bits, a_bits, 16),
            QuantSetting("dgq", w_bits, a_bits, 8, shared_channel_groups=True),
            QuantSetting("dgq", w_bits, a_bits, 8, prob_quantizer="uniform"),
            QuantSetting("dgq", w_bits, a_bits, 8, prob_quantizer="log-sqrt2"),
            QuantSetting("dgq", w_bits, a_bits, 16, prob_quantizer="log-sqrt2"),
            QuantSetting("pertensor", w_bits, a_bits),
            QuantSetting("dynamic", w_bits, a_bits),
        )
    ]


def quantized_model(
    calibrations: dict[bool, UNetCalibration], model: Path, setting: QuantSetting, out_dir: Path
) -> float:
    """Quantize the model for one setting from the shared statistics and save it to `out_dir`; returns seconds.

    Args:
        calibrations: the statistics runs by whether they were collected for DGQ (see `UNetCalibration`).
        model: the full-precision model directory.
        setting: the row to make.
        out_dir: the quantized pipeline directory to write (its base model is `model`).
    """
    began = time.perf_counter()
    pipe = dgq_core.from_pretrained(model)
    calibration = calibrations[setting.method == "dgq"]
    # The statistics run's settings (steps, guidance, seed, size), this row's method, bits and codes.
    config = replace(
        calibration.config, method=setting.method, w_bits=setting.w_bits, a_bits=setting.a_bits,
        groups=setting.groups, shared_channel_groups=setting.shared_channel_groups,
        prob_quantizer=setting.prob_quantizer,
    )
    calibration.quantize(pipe.unet, config)
    dgq_core.save_pretrained(pipe, out_dir, self_contained=False, base_model=str(model))
    return time.perf_counter() - began


def run(
    out_dir: Path,
    model: Path,
    num: int,
    steps: int,
    guidance: float,
    num_calib: int,
    settings: list[QuantSetting],
    exec_mode: str = "fake",
) -> list[tuple[str, harness.EvalReport]]:
    """Evaluate full precision, then quantize and evaluate every setting.

    Args:
        out_dir: working directory (quantized models, images, quality.json, quality.md).
        model: the full-precision model directory.
        num: held-out prompts (= images per row).
        steps: sampler steps (also the calibrated steps).
        guidance: CFG scale (also the calibration's).
        num_calib: calibration prompts per quantized model.
        settings: the quantized rows.
        exec_mode: execution of the quantized UNets (`dgq_core.config.EXEC_MODES`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = harness.heldout_prompts(num)
    config = harness.EvalConfig(
        model=str(model),
        prompts=prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        exec_mode=exec_mode,
    )
    reports = [("FP32", harness.evaluate(config, save_images_dir=out_dir / "images" / "fp"))]
    # One statistics run serves every bit width and K; DGQ and the baselines record attention differently.
    calibration_prompts = dgq_core.default_calibration_prompts(model, num_calib, seed=0)
    calibrations = {}
    for for_dgq in sorted({setting.method == "dgq" for setting in settings}, reverse=True):
        stats_config = dgq_core.DGQConfig(
            method="dgq" if for_dgq else "pertensor", steps=steps, guidance_scale=guidance, num_calib=num_calib
        )
        calibrations[for_dgq] = dgq_core.collect_unet_stats(
            dgq_core.from_pretrained(model), stats_config, calibration_prompts
        )
    for setting in tqdm(settings, desc="quantized settings"):
        quantized_dir = out_dir / "models" / setting.dirname
        seconds = quantized_model(calibrations, model, setting, quantized_dir)
        report = harness.evaluate(
            harness.EvalConfig(**{**asdict(config), "model": str(quantized_dir)}),
            reference=out_dir / "images" / "fp",
            save_images_dir=out_dir / "images" / setting.dirname,
        )
        report.extra["quantize_seconds"] = round(seconds, 1)
        report.extra["calibration_seconds"] = round(calibrations[setting.method == "dgq"].seconds, 1)
        reports.append((setting.label, report))
        _write(out_dir, reports, num, steps, guidance, num_calib, exec_mode)
    _write(out_dir, reports, num, steps, guidance, num_calib, exec_mode)
    return reports


def _write(out_dir, reports, num, steps, guidance, num_calib, exec_mode) -> None:
    settings = {
        "num_prompts": num,
        "steps": steps,
        "guidance_scale": guidance,
        "num_calib": num_calib,
        "exec": exec_mode,
    }
    (out_dir / "quality.json").write_text(
        json.dumps(
            {"settings": settings, "rows": [{"label": lbl, **asdict(r)} for lbl, r in reports]}, indent=1
        )
        + "\n"
    )
    (out_dir / "quality.md").write_text(harness.format_markdown(reports))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dgq_eval.benchmark`."""
    parser = argparse.ArgumentParser(
        prog="python -m dgq_eval.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=bundled_model_dir())
    parser.add_argument("--num", type=int, default=64, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=harness.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=harness.DEFAULT_GUIDANCE)
    parser.add_argument("--num-calib", type=int, default=32)
    parser.add_argument("--precisions", default="8/8,4/8,8/6,4/6", help="W/A pairs, comma-separated")
    parser.add_argument("--methods", default="dgq8,dgq16,pertensor,dynamic", help="rows per precision (also: dgq8shared, dgq8uniform, dgq8sqrt2, dgq16sqrt2)")
    parser.add_argument("--exec", dest="exec_mode", choices=EXEC_MODES, default="fake")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = [tuple(int(b) for b in pair.split("/")) for pair in args.precisions.split(",")]
    wanted = set(args.methods.split(","))
    settings = [
        s for s in default_settings(precisions)
        if s.key in wanted
    ]  # fmt: skip
    reports = run(
        args.out, args.model, args.num, args.steps, args.guidance, args.num_calib, settings, args.exec_mode
    )
    print(harness.format_markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
