"""The CPU peers of issue 22 side by side: (a) one SD v1.5-architecture UNet call, (b) the bundled model end to end.

(a) diffusers' default `UNet2DConditionModel` (SD v1.5 architecture, random init), 256 px (32x32 latents), batch 2,
77 tokens, as bench/bench_unet.py builds it. Every quantized variant calibrates on the timed call's own inputs (DGQ's
activation groups as bench_unet.py calibrates them, NNCF's statistics likewise). Rows:
    PyTorch FP32 eager; dgq-serve DGQ-int W8A8 in exec mode "int" (named by its CPU kernels: vnni or onednn, and
    cpu_attention where the CPU has AVX-512); torch.ao dynamic int8
    (Linear layers); torchao Int8DynamicActivationInt8Weight, eager (and compiled with --compile); SDNQ int8
    Linear + Conv with its quantized matmuls; torch.compile FP32 (--compile); OpenVINO FP32 IR with the f32 hint and with the default hint (bf16 where
    the CPU has it); OpenVINO INT8 by NNCF PTQ, default and SmoothQuant (`model_type=TRANSFORMER`).
The torch variants live in this process; the OpenVINO IRs are made in a fresh process (export and NNCF take several
GB beside the FP32 UNet) and saved, then compiled in another fresh process that serves timed calls over a pipe, so
that every round times one call of every variant, torch and OpenVINO alike (`common.time_interleaved`).

(b) the bundled model (dgq_zoo/dgq-shapes), 16 prompts per pipeline call, 25 steps, guidance 5, timed as dgq_eval's
harness generates: FP32, its shipped DGQ checkpoint under exec mode auto, and the same torch and OpenVINO peers on the
FP32 UNet (NNCF calibrated on the FP pipeline's UNet inputs for the model's calibration prompts, as `dgq-eval
--openvino` does).

A peer that is not installed is left out with a note in the JSON and the table (`pip install -e '.[peers]'`
installs them all): the other rows still compare.

Usage:
    .venv/bin/python bench/bench_cpu_peers.py --repeats 5 --out runs/bench_cpu_peers.json
    .venv/bin/python bench/bench_cpu_peers.py --part e2e --repeats 5 --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import (  # noqa: E402
    ao_dynamic_copy,
    build_unet,
    calibrate_one_call,
    psnr_db,
    quant_config,
    quantized_copy,
    unet_inputs,
)
from common import load_average, machine, median, time_interleaved  # noqa: E402

import dgq_core  # noqa: E402
from dgq_core.kernels import int_execution_summary, set_exec_mode  # noqa: E402
from dgq_eval import harness, metrics, openvino_unet  # noqa: E402
from dgq_zoo import bundled_model_dir  # noqa: E402

PEERS_HINT = "pip install -e '.[peers]'"
OPENVINO_ROWS = {
    "fp32-f32hint": "OpenVINO FP32 IR (f32 hint)",
    "fp32": "OpenVINO FP32 IR (default hint)",
    "int8": "OpenVINO INT8 (NNCF PTQ, default)",
    "int8-smoothquant": "OpenVINO INT8 (NNCF PTQ, SmoothQuant)",
}
E2E_PROMPTS = 16
E2E_STEPS = 25


def torchao_int8(unet: nn.Module) -> nn.Module:
    """torchao's Int8DynamicActivationInt8Weight on the Linear layers (its default filter), in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(unet, Int8DynamicActivationInt8WeightConfig())
    return unet


def sdnq_int8(unet: nn.Module) -> nn.Module:
    """SDNQ int8 weights on Linear and Conv layers with its quantized matmuls (`torch._int_mm`), in place."""
    from sdnq import sdnq_post_load_quant

    return sdnq_post_load_quant(
        unet, weights_dtype="int8", quant_conv=True, use_quantized_matmul=True, use_quantized_matmul_conv=True,
        torch_dtype=torch.float32,
    )  # fmt: skip


def compiled(unet: nn.Module) -> nn.Module:
    return torch.compile(unet)


# Rows made from a full-precision torch UNet (the pipeline's own for (b)): name -> (peer module the row needs, how it
# is made, whether it compiles).
TORCH_PEERS: dict[str, tuple[str | None, Callable[[nn.Module], nn.Module], bool]] = {
    "torch.ao dynamic int8 (Linear)": (None, ao_dynamic_copy, False),
    "torchao Int8DynAct-Int8Weight, eager": ("torchao", torchao_int8, False),
    "torchao Int8DynAct-Int8Weight, compiled": ("torchao", compiled, True),
    "SDNQ int8 Linear + Conv": ("sdnq", sdnq_int8, False),
    "torch.compile FP32": (None, compiled, True),
}

# Rows whose `make` leaves its input as it was.
SHARES_INPUT = ("torch.ao dynamic int8 (Linear)", "torch.compile FP32")
# Rows made from another row's model rather than the FP32 one: the compiled torchao row compiles the eager row's
# quantized UNet (sharing its weights: a second quantized copy of SD's UNet would not fit 24 GB beside the rest).
MADE_FROM = {"torchao Int8DynAct-Int8Weight, compiled": "torchao Int8DynAct-Int8Weight, eager"}


def missing(module: str | None) -> str | None:
    """Why a peer's row is left out (its module is not installed), or None."""
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as error:
        return f"{module} not installed ({error}): {PEERS_HINT}"
    return None


def torch_peers(with_compile: bool) -> tuple[dict, dict[str, str]]:
    """The torch peer rows to run, and a note for each one left out."""
    rows, notes = {}, {}
    for name, (module, make, compiles) in TORCH_PEERS.items():
        if compiles and not with_compile:
            notes[name] = "not run: --compile not given"
        elif (reason := missing(module)) is not None:
            notes[name] = reason
        else:
            rows[name] = make
    return rows, notes


def peer_model(name: str, make: Callable[[nn.Module], nn.Module], fp32: nn.Module, made: dict[str, nn.Module]):
    """Row `name`'s UNet, made from `fp32` (a copy of it where `make` changes its input) or from the model of the
    row it is `MADE_FROM`, which `made` holds."""
    if name in MADE_FROM:
        return make(made[MADE_FROM[name]])
    return make(fp32 if name in SHARES_INPUT else copy.deepcopy(fp32))


# ---- (a) one SD v1.5-architecture UNet call ----


@torch.no_grad()
def export_openvino_irs(out_dir: Path) -> None:
    """(fresh process) The SD UNet's FP32 IR and NNCF's two INT8 IRs, calibrated on the timed call, saved as .xml."""
    ov, _ = openvino_unet.require_openvino()
    unet = build_unet()
    inputs = unet_inputs(unet)
    model = openvino_unet.export_unet(unet, inputs, dynamic_batch=False)
    del unet
    ov.save_model(model, out_dir / "fp32.xml", compress_to_fp16=False)
    for variant in ("int8", "int8-smoothquant"):
        quantized = openvino_unet.quantize_int8(model, [inputs], smooth_quant=variant == "int8-smoothquant")
        ov.save_model(quantized, out_dir / f"{variant}.xml", compress_to_fp16=False)
        del quantized


@torch.no_grad()
def serve_openvino_calls(ir_dir: Path) -> None:
    """(fresh process) Compile the IRs, then run one call of the variant named on each stdin line; "save PATH"
    writes every variant's last output."""
    inputs = unet_inputs(build_unet_shapes_only())
    compiled_models = {
        variant: openvino_unet.compile_model(ir_dir / f"{'fp32' if variant.startswith('fp32') else variant}.xml",
                                             f32=variant == "fp32-f32hint")
        for variant in OPENVINO_ROWS
    }  # fmt: skip
    outputs = {}
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command.startswith("save "):
            np.savez(command.removeprefix("save "), **{name: out.numpy() for name, out in outputs.items()})
        else:
            outputs[command] = openvino_unet.infer(
                compiled_models[command], inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
            )
        print("done", flush=True)


def build_unet_shapes_only() -> nn.Module:
    """The SD UNet on the meta device: enough for `unet_inputs` to read its config, without 3.4 GB of weights."""
    with torch.device("meta"):
        return build_unet()


class OpenVINOCalls:
    """The fresh process that serves the OpenVINO variants' calls (`serve_openvino_calls`)."""

    def __init__(self, ir_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-openvino", str(ir_dir)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.process.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"the OpenVINO process answered {line!r}, not {word!r} (exit {self.process.poll()})")

    def call(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@torch.no_grad()
def bench_unet_call(repeats: int, warmup: int, groups: int, with_compile: bool, work: Path) -> dict:
    """Part (a): seconds per SD v1.5 UNet call of every row, interleaved."""
    notes: dict[str, str] = {}
    openvino = None
    if (reason := missing("openvino") or missing("nncf")) is None:
        subprocess.run([sys.executable, __file__, "--export-openvino", str(work)], check=True)
        openvino = OpenVINOCalls(work)
    else:
        notes.update(dict.fromkeys(OPENVINO_ROWS.values(), reason))

    fp32 = build_unet()
    inputs = unet_inputs(fp32)
    calibrated, stats = calibrate_one_call(fp32, quant_config(8, groups), inputs)
    dgq = quantized_copy(fp32, calibrated, stats)
    set_exec_mode(dgq, "int")  # as workers run it: integer layers and, with AVX-512, the fused attention
    models = {"PyTorch FP32 eager": fp32, f"dgq-serve DGQ-int W8A8 ({int_execution_summary(dgq)['int_kernels']})": dgq}
    peers, peer_notes = torch_peers(with_compile)
    notes.update(peer_notes)
    for name, make in tqdm(peers.items(), desc="building peers", unit="peer"):
        models[name] = peer_model(name, make, fp32, models)
    outputs: dict[str, torch.Tensor] = {}

    def torch_call(name: str, model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = model(**inputs).sample

        return run

    variants = {name: torch_call(name, model) for name, model in models.items()}
    if openvino is not None:
        variants.update({row: (lambda v=variant: openvino.call(v)) for variant, row in OPENVINO_ROWS.items()})
    times = time_interleaved(variants, repeats, warmup)
    if openvino is not None:
        openvino.call(f"save {work / 'openvino_outputs.npz'}")
        openvino.close()
        saved = np.load(work / "openvino_outputs.npz")
        outputs.update({row: torch.from_numpy(saved[variant]) for variant, row in OPENVINO_ROWS.items()})
    reference = outputs["PyTorch FP32 eager"]
    fp32_s = median(times["PyTorch FP32 eager"])
    return {
        "setup": "diffusers UNet2DConditionModel() default config (SD v1.5 architecture), random init, 256 px "
                 f"(32x32 latents), batch 2, 77 tokens; DGQ W8A8 K={groups}; NNCF calibrated on the timed call",
        "rows": {
            name: {"median_s": median(seconds), "x_fp32_eager": fp32_s / median(seconds), "all_s": seconds,
                   "psnr_vs_fp32_db": psnr_db(outputs[name], reference)}
            for name, seconds in times.items()
        },
        "left_out": notes,
    }  # fmt: skip


# ---- (b) the bundled model end to end ----


@torch.no_grad()
def bench_end_to_end(repeats: int, warmup: int, with_compile: bool) -> dict:
    """Part (b): images/s of the bundled model, FP32, its shipped DGQ checkpoint (auto) and the peers."""
    model = bundled_model_dir()
    config = harness.EvalConfig(model=str(model), prompts=harness.heldout_prompts(E2E_PROMPTS),
                                num_inference_steps=E2E_STEPS, batch_size=E2E_PROMPTS)  # fmt: skip
    pipes = {
        "PyTorch FP32 eager": harness.load_model(model),
        "dgq-serve DGQ W8A8 checkpoint, exec auto": harness.load_model(model.with_name("dgq-shapes-dgq"), "auto"),
    }
    peers, notes = torch_peers(with_compile)
    for name, make in peers.items():
        pipe = harness.load_model(model)
        pipe.unet = peer_model(name, make, pipe.unet, {row: made.unet for row, made in pipes.items()})
        pipes[name] = pipe
    if (reason := missing("openvino") or missing("nncf")) is None:
        calibration_prompts = dgq_core.default_calibration_prompts(model, config.num_calib, seed=0)
        for variant, row in tqdm(OPENVINO_ROWS.items(), desc="OpenVINO variants", unit="IR"):
            pipe = harness.load_model(model)
            openvino_unet.use_openvino_unet(pipe, variant, calibration_prompts, config.num_inference_steps, config.guidance_scale)
            pipes[row] = pipe
    else:
        notes.update(dict.fromkeys(OPENVINO_ROWS.values(), reason))
    images: dict[str, np.ndarray] = {}

    def generation(name: str, pipe) -> Callable[[], None]:
        def run() -> None:
            images[name] = harness.generate(pipe, config, desc=name)[0]

        return run

    times = time_interleaved({name: generation(name, pipe) for name, pipe in pipes.items()}, repeats, warmup)
    fp32_rate = E2E_PROMPTS / median(times["PyTorch FP32 eager"])
    reference = images["PyTorch FP32 eager"]
    return {
        "setup": f"{model.name}: {E2E_PROMPTS} prompts in one pipeline call, {E2E_STEPS} steps, guidance "
                 f"{config.guidance_scale}, the model's scheduler",
        "rows": {
            name: {"images_per_s": E2E_PROMPTS / median(seconds),
                   "x_fp32_eager": E2E_PROMPTS / median(seconds) / fp32_rate, "all_s": seconds,
                   "image_psnr_vs_fp32_db": metrics.mean_psnr(images[name], reference)}
            for name, seconds in times.items()
        },
        "left_out": notes,
    }  # fmt: skip


def table(part: dict, speed: str) -> str:
    """A markdown table of one part's rows, and its left-out rows."""
    lines = [f"| variant | {speed} | × PyTorch FP32 eager | PSNR vs FP32 (dB) |", "|---|---|---|---|"]
    psnr_key = "psnr_vs_fp32_db" if "psnr_vs_fp32_db" in next(iter(part["rows"].values())) else "image_psnr_vs_fp32_db"
    for name, row in part["rows"].items():
        lines.append(f"| {name} | {row[speed]:.3f} | {row['x_fp32_eager']:.2f} | {row[psnr_key]:.1f} |")
    lines += [f"| {name} | left out: {why} | | |" for name, why in part["left_out"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("unet", "e2e", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--groups", type=int, default=8, help="DGQ activation groups K of the SD UNet")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile rows (minutes of compiling)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cpu_peers.json"), help="results JSON")
    parser.add_argument("--export-openvino", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-openvino", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_openvino:
        export_openvino_irs(args.export_openvino)
        return
    if args.serve_openvino:
        serve_openvino_calls(args.serve_openvino)
        return

    results = {"machine": machine(), "load_average_before": load_average()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # after each part: the UNet part needs most of the memory, and a part that dies must not take the other's
        # figures with it
        results["machine"] = machine()
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    if args.part in ("e2e", "both"):
        results["end_to_end"] = bench_end_to_end(args.repeats, args.warmup, args.compile)
        results["load_average_after_end_to_end"] = load_average()
        save()
    if args.part in ("unet", "both"):
        with tempfile.TemporaryDirectory(prefix="bench_cpu_peers_") as work:
            results["unet_call"] = bench_unet_call(args.repeats, args.warmup, args.groups, args.compile, Path(work))
        results["load_average_after_unet_call"] = load_average()
        save()
    print(json.dumps(results["machine"]))
    if "end_to_end" in results:
        print(f"\nThe bundled model end to end ({results['end_to_end']['setup']}):\n")
        print(table(results["end_to_end"], "images_per_s"))
    if "unet_call" in results:
        print(f"\nOne SD v1.5 UNet call ({results['unet_call']['setup']}):\n")
        print(table(results["unet_call"], "median_s"))


if __name__ == "__main__":
    main()
