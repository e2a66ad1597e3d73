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
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dgq_core
from dgq_core import EXEC_MODES, UNetCalibration, load_reconstructed_weights, save_reconstructed_weights
from dgq_eval import harness
from dgq_zoo import bundled_model_dir

PRECISIONS = ((8, 8), (4, 8), (8, 6), (4, 6))


# How a row's variants show in its --methods key (tokens after the method and K, joined by "-") and in its label.
_TOKENS = {
    "shared": ("shared_channel_groups", True, " shared groups"),
    "sqrt2": ("prob_quantizer", "log-sqrt2", " log-sqrt2 probs"),
    "uniform": ("prob_quantizer", "uniform", " uniform probs"),
    "static": ("prob_scale", "static", " static scale"),
    "nosplit": ("start_split", False, " no start split"),
    "channel": ("axis", "channel", " channel axis"),
    "pixel": ("axis", "pixel", " pixel axis"),
    "ada": ("weight_rounding", "adaround", " AdaRound"),
    "qstats": ("calib_source", "quantized", " stats from quantized"),
    "fpstats": ("calib_source", "fp", " stats from FP"),
}


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
        prob_scale, start_split, axis: Table 3's ablation switches ("dgq" only; see DGQConfig).
        weight_rounding: "nearest" or "adaround" (see DGQConfig).
        calib_source: "fp" or "quantized" (see DGQConfig).
    """

    method: str
    w_bits: int
    a_bits: int
    groups: int = 16
    shared_channel_groups: bool = False
    prob_quantizer: str = "log2"
    prob_scale: str = "dynamic"
    start_split: bool = True
    axis: str = "auto"
    weight_rounding: str = "nearest"
    calib_source: str = dgq_core.DGQConfig.calib_source

    @classmethod
    def parse(cls, key: str, w_bits: int, a_bits: int) -> QuantSetting:
        """The row a --methods key names: "pertensor", "dynamic" or "dgq<K>", then variant tokens joined by "-"
        (`dgq8-sqrt2-ada`; the first may follow K directly, as in `dgq8sqrt2`); see `_TOKENS`."""
        match = re.fullmatch(r"(dgq)(\d+)(.*)|(pertensor|dynamic)(.*)", key)
        if match is None:
            raise ValueError(f"unknown --methods key {key!r}: pertensor, dynamic or dgq<K>, then -tokens of {sorted(_TOKENS)}")
        method, groups, rest = (match[1], int(match[2]), match[3]) if match[1] else (match[4], 16, match[5])
        fields_ = {}
        for token in filter(None, rest.split("-")):
            if token not in _TOKENS:
                raise ValueError(f"unknown variant {token!r} in {key!r}; known: {sorted(_TOKENS)}")
            name, value, _ = _TOKENS[token]
            fields_[name] = value
        return cls(method, w_bits, a_bits, groups, **fields_)

    def _tokens(self) -> list[str]:
        defaults = QuantSetting(self.method, self.w_bits, self.a_bits)
        return [
            token for token, (name, value, _) in _TOKENS.items()
            if getattr(self, name) == value and getattr(defaults, name) != value
        ]  # fmt: skip

    @property
    def key(self) -> str:
        """Its name in --methods: dgq8, dgq16, dgq8-sqrt2, dgq8-sqrt2-ada, pertensor, pertensor-ada, ..."""
        head = f"dgq{self.groups}" if self.method == "dgq" else self.method
        return "-".join([head, *self._tokens()])

    @property
    def label(self) -> str:
        suffix = f" K={self.groups}" if self.method == "dgq" else ""
        suffix += "".join(_TOKENS[token][2] for token in self._tokens())
        return f"W{self.w_bits}A{self.a_bits} {self.method}{suffix}"

    @property
    def dirname(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}_{self.key}"

    def config(self, base: dgq_core.DGQConfig) -> dgq_core.DGQConfig:
        """`base`'s calibration settings (steps, guidance, seed, size, iterations) with this row's."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **settings)


def default_settings(precisions=PRECISIONS) -> list[QuantSetting]:
    """DGQ K=8, DGQ K=16, DGQ K=8 with shared channel groups, DGQ K=8 with uniform attention probabilities, DGQ K=8
    and K=16 with base-sqrt(2) log attention probabilities, and the per-tensor and dynamic baselines, at each
    precision."""
    keys = ("dgq8", "dgq16", "dgq8-shared", "dgq8-uniform", "dgq8-sqrt2", "dgq16-sqrt2", "pertensor", "dynamic")
    return [QuantSetting.parse(key, w_bits, a_bits) for w_bits, a_bits in precisions for key in keys]


def stats_kind(setting: QuantSetting) -> tuple[bool, bool]:
    """Which statistics run a row takes: DGQ or the baselines, and whether the `<start>` column is split off (see
    `UNetCalibration.collected_like`)."""
    return setting.method == "dgq", setting.method == "dgq" and setting.start_split


@dataclass
class SharedRuns:
    """What rows share: one statistics run per `stats_kind`, and one AdaRound reconstruction per weight width.

    Args:
        calibrations: statistics runs by `stats_kind`.
        base: the runs' settings (steps, guidance, seed, reconstruction iterations).
        weights: reconstructed weights and their report, by weight bits, made on first use.
    """

    calibrations: dict[tuple[bool, bool], UNetCalibration]
    base: dgq_core.DGQConfig
    weights_dir: Path | None = None
    weights: dict[int, tuple[dict, dict]] = field(default_factory=dict)

    def reconstructed(self, unet, calibration: UNetCalibration, config: dgq_core.DGQConfig) -> tuple[dict, dict]:
        """AdaRound weights for `config`'s weight bits: made once per run, or read from `weights_dir` when an
        earlier run with the same calibration settings left them there (an interrupted one left its finished units,
        which this run goes on from)."""
        if config.w_bits in self.weights:
            return self.weights[config.w_bits]
        stem = (
            f"adaround_w{config.w_bits}_i{config.recon_iters}_r{config.recon_samples}_c{config.num_calib}"
            f"_s{config.steps}_g{config.guidance_scale:g}_seed{config.seed}"
        )
        path = self.weights_dir / f"{stem}.safetensors" if self.weights_dir else None
        if path is not None and path.is_file():
            weights = load_reconstructed_weights(path)
            info = json.loads(path.with_suffix(".json").read_text())
        else:
            resume_file = path.with_suffix(".progress.safetensors") if path is not None else None
            if resume_file is not None:
                resume_file.parent.mkdir(parents=True, exist_ok=True)
            weights, report = calibration.reconstruct(unet, config, resume_file=resume_file)
            info = {
                "reconstruction_seconds": round(report.seconds, 1), "training_seconds": round(report.train_seconds, 1),
                "reconstruction": f"{report.units} units x {report.iters} steps, {report.rows} rows",
            }  # fmt: skip
            if path is not None:
                save_reconstructed_weights(weights, path)
                path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
                resume_file.unlink(missing_ok=True)
        self.weights[config.w_bits] = weights, info
        return weights, info

    def quantize(self, unet, setting: QuantSetting) -> dict:
        """Quantize `unet` (full precision, of the calibrated model) for `setting`; returns what it cost."""
        calibration = self.calibrations[stats_kind(setting)]
        config = setting.config(self.base)
        extra = {"calibration_seconds": round(calibration.seconds, 1)}
        weights = None
        if config.weight_rounding == "adaround":
            weights, info = self.reconstructed(unet, calibration, config)
            extra.update(info)
        calibration.quantize(unet, config, weights)
        return extra


def quantized_model(shared: SharedRuns, model: Path, setting: QuantSetting, out_dir: Path) -> dict:
    """Quantize the model for one setting from the shared runs and save it to `out_dir`; returns its costs.

    Args:
        shared: the statistics runs and reconstructions rows share.
        model: the full-precision model directory.
        setting: the row to make.
        out_dir: the quantized pipeline directory to write (its base model is `model`).
    """
    began = time.perf_counter()
    pipe = dgq_core.from_pretrained(model)
    extra = shared.quantize(pipe.unet, setting)
    dgq_core.save_pretrained(pipe, out_dir, self_contained=False, base_model=str(model))
    return {"quantize_seconds": round(time.perf_counter() - began, 1), **extra}


def run(
    out_dir: Path,
    model: Path,
    num: int,
    steps: int,
    guidance: float,
    num_calib: int,
    settings: list[QuantSetting],
    exec_mode: str = "fake",
    recon_iters: int = dgq_core.DGQConfig.recon_iters,
    weights_dir: Path | None = None,
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
        recon_iters: AdaRound steps per unit of the rows that reconstruct.
        weights_dir: where reconstructed weights are kept for later runs (None: not kept).
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
    # One statistics run serves every bit width and K; DGQ, its no-split ablation and the baselines record attention
    # differently. A run samples probabilities and records the UNet's inputs when one of its rows needs them.
    calibration_prompts = dgq_core.default_calibration_prompts(model, num_calib, seed=0)
    base = dgq_core.DGQConfig(steps=steps, guidance_scale=guidance, num_calib=num_calib, recon_iters=recon_iters)
    calibrations = {}
    for kind in sorted({stats_kind(setting) for setting in settings}, reverse=True):
        rows = [setting.config(base) for setting in settings if stats_kind(setting) == kind]
        stats_config = replace(
            rows[0], prob_scale="static" if any(r.samples_probs for r in rows) else "dynamic", axis="auto"
        )
        calibrations[kind] = dgq_core.collect_unet_stats(
            dgq_core.from_pretrained(model), stats_config, calibration_prompts,
            record_inputs=any(r.replays_unet_inputs for r in rows),
        )
    shared = SharedRuns(calibrations, base, weights_dir)
    for setting in tqdm(settings, desc="quantized settings"):
        quantized_dir = out_dir / "models" / setting.dirname
        extra = quantized_model(shared, model, setting, quantized_dir)
        report = harness.evaluate(
            harness.EvalConfig(**{**asdict(config), "model": str(quantized_dir)}),
            reference=out_dir / "images" / "fp",
            save_images_dir=out_dir / "images" / setting.dirname,
        )
        report.extra.update(extra)
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
    parser.add_argument(
        "--methods", default="dgq8,dgq16,pertensor,dynamic",
        help="rows per precision: pertensor, dynamic or dgq<K>, each with variant tokens joined by '-' "
        f"({', '.join(_TOKENS)}), e.g. dgq8-sqrt2-ada",
    )
    parser.add_argument(
        "--recon-iters", type=int, default=dgq_core.DGQConfig.recon_iters, help="AdaRound steps per unit (-ada rows)"
    )
    parser.add_argument(
        "--weights-dir", type=Path,
        help="keep reconstructed AdaRound weights here, and take them from here when a run with the same "
        "calibration settings left them",
    )
    parser.add_argument("--exec", dest="exec_mode", choices=EXEC_MODES, default="fake")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = [tuple(int(b) for b in pair.split("/")) for pair in args.precisions.split(",")]
    settings = [QuantSetting.parse(key, w, a) for w, a in precisions for key in args.methods.split(",")]
    reports = run(
        args.out, args.model, args.num, args.steps, args.guidance, args.num_calib, settings, args.exec_mode,
        args.recon_iters, args.weights_dir,
    )
    print(harness.format_markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
