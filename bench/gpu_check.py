"""The one prepared check for a lent GPU (issue 16): every figure of dgq-serve's CUDA path, its main bars in one
device call (two calls fit a session's device time, below).

Any session that is lent an H200 runs it first (`bench/gpu_check.sh`, below). Its parts, in the order of the issue's
bars (each writes its results as it ends; a part that fails records its error and the next one runs; a part that
would not end within `--budget-s` is skipped and named, so that a later call can run it with `--parts`):

    cuda-tests       pytest -m cuda (tests/test_cuda.py): the fused GEMM and attention against the reference on the
                     GPU, int vs fake on the tiny pipeline (>= 40 dB, same seed same image), CUDA graphs
    unet-sd15        SD v1.5-architecture UNet (random init) at 512 px, batch 1, 2 and 8: FP16 eager (SDPA), FP16 +
                     torch.compile (batch 8), DGQ-int W8A8 and W4A8 (CUDA graphs; W8A8 also eager), DGQ-fake: time
                     per call (interleaved medians), peak GPU memory, resident weight bytes, PSNR vs fake and vs FP16
                     (bench/bench_unet_cuda.py); each layer's int vs fake time, which sets `auto` on CUDA; and
                     torch.profiler's kernels of one batch-8 call of FP16 and of DGQ-int, where the time goes
    service-bundled  the service on CUDA with the bundled model: POST /generate latency, the batch-4 speed-up, the
                     worker's GPU memory metrics (bench/bench_service.py)
    attention        the fused attention at SD/SDXL shapes and dot precisions vs the reference and FP16 SDPA
                     (bench/bench_attention_cuda.py)
    quantize-sd15    `dgq quantize` of a random SD v1.5-architecture pipeline on the GPU, 4 prompts x 4 steps: wall
                     time and peak GPU memory
    service-sd15     the service on CUDA with that checkpoint at 512 px
    unet-sdxl        the SDXL-architecture UNet at 1024 px, batch 1 and 2 (as unet-sd15, without torch.compile)
    adaround-sd15    `dgq quantize --weight-rounding adaround` of that pipeline at W4A8, 4 prompts x 4 steps,
                     200 steps per unit: AdaRound's step rate on the GPU and the official 20,000 steps' training
                     time from it (issue 17; last, so a later call runs it with --parts)

Results in `--out` ($OUT on the device machine): gpu_check.json (everything), gpu_check.md (the tables and the
issue's bars, for BENCHMARKS.md), pytest.txt; gpu_check.sh adds log.txt and nvidia-smi.txt. The JSON's
"cuda_auto_min_weights" is what `dgq_core/kernels/execution.py`'s `CUDA_AUTO_MIN_WEIGHTS` is to be set to.

The lent machine (nvidia-h200) has Python 3.12, torch 2.11, Triton 3.6, pytest, transformers, accelerate, httpx,
but not diffusers, fastapi, uvicorn or pydantic: these wheels travel in `.whl/` (17 MiB; ignored by git: once per
clone `echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"`), downloaded here with

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 \\
        pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        annotated-doc==0.0.7 python-dotenv==1.2.4 redis==8.2.0 swagger-ui-py==25.7.1 opentelemetry-api==1.45.2 \\
        importlib-metadata==10.2.0 lazy-importer==0.1.0 typing-extensions==4.16.0

and the check runs with the device tool from the repository root. A session has 15 minutes of device time, the
machine's start (1-2 minutes) included, so the first call is sized to leave room for a second one: at most 7.5
minutes, its parts within `--budget-s` 360 (the CUDA tests and the SD v1.5 UNet, the issue's main bars); the second
call reruns it if it failed, or else takes the next parts on the still warm machine (the tree and the wheels: 65.0 MB
of the 67.1 MB, 64 MiB, a call carries):

    run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=450)
    run(command="bash bench/gpu_check.sh --budget-s 220 --parts service-bundled,attention,quantize-sd15",
        carry=[".whl"], timeout_s=300)

service-sd15, unet-sdxl and adaround-sd15 are left to a later session's calls with `--parts`.

Rehearsal on CPU (tests/test_gpu_check.py runs it; the tiny models, integers on oneDNN, the attention kernel in
Triton's interpreter, the CUDA tests deselected):

    TRITON_INTERPRET=1 .venv/bin/python bench/gpu_check.py --tiny --device cpu --out runs/gpu_check_tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))
import bench_attention_cuda  # noqa: E402
import bench_service  # noqa: E402
import bench_unet_cuda  # noqa: E402
from common import load_average  # noqa: E402

from dgq_core.reconstruction import AdaRoundRecipe  # noqa: E402
from dgq_zoo import bundled_model_dir  # noqa: E402

# AdaRound steps per unit of `adaround-sd15`: enough that training, not the caching passes, sets the measured rate.
ADAROUND_ITERS = 200


@dataclass
class Check:
    """What every part needs.

    Args:
        device (`torch.device`): "cuda", or "cpu" for the rehearsal.
        tiny (`bool`): the rehearsal's small models and sizes.
        out (`Path`): where the results go.
        work (`Path`): scratch space (models and checkpoints the parts make).
    """

    device: torch.device
    tiny: bool
    out: Path
    work: Path
    quantized_sd15: Path | None = None

    @property
    def device_name(self) -> str:
        return self.device.type if self.device.type == "cpu" else str(self.device)


def cuda_tests(check: Check) -> dict:
    """`TRITON_INTERPRET=0 pytest -m cuda tests/test_cuda.py` in a process of its own: Triton compiles, not interprets."""
    # On CPU (the rehearsal) the CUDA tests are deselected and the interpreter runs as in the suite.
    env = dict(os.environ, TRITON_INTERPRET="1" if check.device.type == "cpu" else "0")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (check.out / "pytest.txt").write_text(result.stdout + result.stderr)
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed|deselected|error)", line)]
    return {"returncode": result.returncode, "summary": summary[-1] if summary else result.stdout[-500:]}


def unet(check: Check, arch: str) -> dict:
    """bench_unet_cuda at the issue's sizes and batches (with the layer sweep for SD v1.5)."""
    if check.tiny:
        return bench_unet_cuda.measure(
            "tiny" if arch == "sd15" else "tiny-sdxl", check.device, 64, [1], [], repeats=1, warmup=0,
            sweep_batch=1 if arch == "sd15" else None, profile_batch=1 if arch == "sd15" else None,
        )  # fmt: skip
    if arch == "sd15":
        return bench_unet_cuda.measure(
            "sd15", check.device, 512, [1, 2, 8], [8], repeats=10, warmup=2, sweep_batch=2, profile_batch=8
        )
    return bench_unet_cuda.measure("sdxl", check.device, 1024, [1, 2], [], repeats=5, warmup=2)


def attention(check: Check) -> dict:
    shapes = bench_attention_cuda.TINY_SHAPES if check.tiny else bench_attention_cuda.SHAPES
    return {"rows": bench_attention_cuda.measure(check.device, shapes, repeats=1 if check.tiny else 10)}


def service(check: Check, model: str) -> dict:
    """bench_service on the device: exec mode int, the bundled model (its shipped DGQ checkpoint) or the random
    SD v1.5 checkpoint of quantize-sd15."""
    if model == "sd15":
        if check.quantized_sd15 is None:
            raise RuntimeError("no SD v1.5 checkpoint: part quantize-sd15 did not run")
        model_args, size, steps = ["--model", str(check.quantized_sd15)], 512, 10
    else:
        model_args, size, steps = [], 32, 10
    # The rehearsal serves in fake quantization: on CPU, exec mode int slices the weights per channel labelling for
    # oneDNN at startup (minutes for the bundled model), which the fused CUDA kernel does not.
    exec_mode = "int" if check.device.type == "cuda" else "fake"
    if check.tiny:
        size, steps = (32 if model == "bundled" else 64), 2
    json_path = check.work / f"service-{model}.json"
    bench_service.main([
        *model_args, "--quantized", "auto", "--exec-mode", exec_mode, "--device", check.device_name,
        "--size", str(size), "--steps", str(steps), "--repeats", "1" if check.tiny else "3",
        "--warmup", "0" if check.tiny else "1", "--port", str(two_free_ports()), "--json", str(json_path),
    ])  # fmt: skip
    return json.loads(json_path.read_text())


def two_free_ports() -> int:
    """A port p such that p and p + 1 are free now (bench_service's two servers)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


def build_sd15_pipeline(directory: Path, tiny: bool) -> Path:
    """A random-init pipeline of the SD v1.5 architecture (UNet, VAE, CLIP ViT-L-sized text encoder; the bundled
    model's tokenizer files at 77 tokens; PNDM), or a small one of the same layout, saved to `directory`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer_dir = bundled_model_dir() / "tokenizer"
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)
    if tiny:
        unet = UNet2DConditionModel(**bench_unet_cuda.TINY_UNET, sample_size=8)
        vae_layout = dict(block_out_channels=(32, 64), latent_channels=4, sample_size=64)
        text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    else:
        unet = UNet2DConditionModel(**bench_unet_cuda.SD15_UNET)
        vae_layout = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512, layers_per_block=2)
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    levels = len(vae_layout["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **vae_layout
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text,
    ))  # fmt: skip
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(directory)
    return directory


def run_quantize(check: Check, model_dir: Path, out_dir: Path, options: list[str], timeout_s: float) -> dict:
    """`dgq quantize` of `model_dir` (the command, in a process of its own), 4 prompts x 4 steps on the device, with
    `options` added: the command, its wall time and the report line it prints."""
    command = [
        sys.executable, "-m", "dgq_core.cli", "quantize", "--model", str(model_dir), "--out", str(out_dir),
        "--num-calib", "4", "--steps", "4", "--batch-size", "4", "--device", check.device_name, *options,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])} failed:\n{result.stderr[-3000:]}")
    return {"command": " ".join(command[1:]), "wall_s": seconds, "report": result.stdout.strip().splitlines()[-1]}


def quantize_sd15(check: Check) -> dict:
    """`dgq quantize` of a random SD v1.5-architecture pipeline: wall time, and the calibration time and peak
    memory it reports."""
    model_dir = build_sd15_pipeline(check.work / "sd15", check.tiny)
    out_dir = check.work / "sd15-dgq"
    run = run_quantize(check, model_dir, out_dir, [], timeout_s=300)
    check.quantized_sd15 = out_dir
    peak_cuda = re.search(r"peak CUDA (\d+) MiB", run["report"])
    return {
        **run, "calibration_s": float(re.search(r"calibration ([\d.]+) s", run["report"]).group(1)),
        "peak_cuda_bytes": int(peak_cuda.group(1)) * 2**20 if peak_cuda else None,
    }  # fmt: skip


def adaround_sd15(check: Check) -> dict:
    """`dgq quantize --weight-rounding adaround` at W4A8 of the random SD v1.5-architecture pipeline of
    `quantize-sd15` (built anew if that part did not run), `ADAROUND_ITERS` steps per unit: the step rate of block
    reconstruction on the device, and from it the training time of the official 20,000 steps per unit (the caching
    passes, which do not grow with the steps, are reported apart)."""
    model_dir = check.work / "sd15"
    if not model_dir.is_dir():
        build_sd15_pipeline(model_dir, check.tiny)
    iters = 5 if check.tiny else ADAROUND_ITERS
    options = ["--w-bits", "4", "--weight-rounding", "adaround", "--recon-iters", str(iters)]
    run = run_quantize(check, model_dir, check.work / "sd15-adaround", options, timeout_s=900)
    found = re.search(r"AdaRound (\d+) units x (\d+) steps on (\d+) rows in ([\d.]+) s \(([\d.]+) s training\)",
                      run["report"])  # fmt: skip
    units, steps, rows, recon_s, train_s = int(found[1]), int(found[2]), int(found[3]), float(found[4]), float(found[5])
    step_s = train_s / (units * steps)
    official = AdaRoundRecipe().iters
    return {
        **run, "units": units, "steps_per_unit": steps, "rows": rows, "reconstruction_s": recon_s,
        "training_s": train_s, "caching_s": recon_s - train_s, "ms_per_step": 1e3 * step_s,
        f"training_h_at_{official}_steps": units * official * step_s / 3600,
    }  # fmt: skip


# Parts in the order they run, with the seconds each is expected to take on an H200 (a guess until measured: the
# budget skips a part whose guess would overrun it).
PARTS: dict[str, tuple[Callable[[Check], dict], float]] = {
    "cuda-tests": (cuda_tests, 100),
    "unet-sd15": (lambda check: unet(check, "sd15"), 240),
    "service-bundled": (lambda check: service(check, "bundled"), 45),
    "attention": (attention, 25),
    "quantize-sd15": (quantize_sd15, 100),
    "service-sd15": (lambda check: service(check, "sd15"), 90),
    "unet-sdxl": (lambda check: unet(check, "sdxl"), 200),
    "adaround-sd15": (adaround_sd15, 150),
}


def bars(parts: dict) -> list[tuple[str, str, str]]:
    """The issue's bars, as (bar, value, met) from what the parts measured."""
    found = []

    def sd15(batch: int, variant: str) -> dict | None:
        rows = parts.get("unet-sd15", {}).get("result", {}).get("rows", [])
        return next((r for r in rows if r.get("batch") == batch and r["variant"] == variant), None)

    def judge(name: str, value: float | None, bound: float, at_least: bool, unit: str = "×") -> None:
        if value is None:
            found.append((name, "not measured", "—"))
        else:
            met = value >= bound if at_least else value <= bound
            found.append((name, f"{value:.2f}{unit}", "met" if met else "**not met**"))

    int8, compiled = sd15(8, "dgq-int-w8a8"), sd15(8, "fp16-compile")
    rows = parts.get("unet-sd15", {}).get("result", {}).get("rows", [])
    # Resident weights do not depend on the batch: any row of the variant.
    weights = {row["variant"]: row["weight_bytes_vs_fp16"] for row in rows}
    judge("SD v1.5 512 px batch 8: W8A8 ≥ 1.3× FP16 eager", int8 and int8["speed_vs_fp16"], 1.3, True)
    judge(
        "SD v1.5 512 px batch 8: W8A8 ≥ 1.0× FP16 + torch.compile",
        int8 and compiled and compiled["s_per_call"] / int8["s_per_call"], 1.0, True,
    )
    int8_1 = sd15(1, "dgq-int-w8a8")
    judge("SD v1.5 512 px batch 1: W8A8 ≥ 1.0× FP16 eager", int8_1 and int8_1["speed_vs_fp16"], 1.0, True)
    for batch in (1, 2, 8):
        w8, w4 = sd15(batch, "dgq-int-w8a8"), sd15(batch, "dgq-int-w4a8")
        judge(f"batch {batch}: W4A8 at least as fast as W8A8", w8 and w4 and w8["s_per_call"] / w4["s_per_call"], 1.0, True)
    judge("resident weights W8 ≤ 0.52× FP16", weights.get("dgq-int-w8a8"), 0.52, False)
    judge("resident weights W4 ≤ 0.27× FP16", weights.get("dgq-int-w4a8"), 0.27, False)
    judge("peak GPU memory of a batch-8 call ≤ 0.7× FP16", int8 and int8.get("peak_vs_fp16"), 0.7, False)
    tests = parts.get("cuda-tests", {}).get("result")
    found.append(("int vs fake ≥ 40 dB on the tiny pipeline, same seed same image (tests/test_cuda.py)",
                  tests["summary"] if tests else "not measured",
                  "—" if not tests else "met" if tests["returncode"] == 0 else "**not met**"))  # fmt: skip
    served = parts.get("service-bundled", {}).get("result")
    if served:
        allocated = served.get("memory_metrics", {}).get("dgq_cuda_memory_allocated_bytes", 0)
        found.append(("the service generates on CUDA with the bundled model; the worker's metrics report GPU memory",
                      f"{served['latency_s']['service']:.3f} s per request, {allocated / 2**20:,.0f} MiB allocated",
                      "met" if allocated > 0 else "**not met**"))  # fmt: skip
    else:
        found.append(("the service generates on CUDA with the bundled model", "not measured", "—"))
    return found


def markdown(results: dict) -> str:
    parts = results["parts"]
    lines = [f"# GPU check: {results['environment']['device']}, {results['environment']['date']}", ""]
    if results["environment"]["tiny"]:
        lines += ["A rehearsal of the script with small models: no figure here measures anything.", ""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} |" for name, part in parts.items()]
    lines += ["", "## Bars", "", "| bar | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {met} |" for name, value, met in bars(parts)]
    for name in ("unet-sd15", "unet-sdxl"):
        result = parts.get(name, {}).get("result")
        if result:
            lines += ["", f"## {name}", "", bench_unet_cuda.markdown(result["rows"])]
            for variant, error in result.get("errors", {}).items():
                lines += ["", f"{variant} failed:", "", "```", error, "```"]
            for variant, table in result.get("profiles", {}).items():
                lines += ["", f"Where one call of {variant} spends its time:", "", "```", table, "```"]
            if "cuda_auto_min_weights" in result:
                lines += ["", f"Exec mode `auto` on CUDA: `CUDA_AUTO_MIN_WEIGHTS = {result['cuda_auto_min_weights']}` "
                          f"(the layer sweep: {len(result['layer_sweep'])} layers at batch {result['sweep_batch']})."]  # fmt: skip
    if parts.get("attention", {}).get("result"):
        lines += ["", "## attention", "", bench_attention_cuda.markdown(parts["attention"]["result"]["rows"])]
    for name in ("quantize-sd15", "service-bundled", "service-sd15", "adaround-sd15"):
        result = parts.get(name, {}).get("result")
        if result:
            lines += ["", f"## {name}", "", "```json", json.dumps(result, indent=2), "```"]
    for name, part in parts.items():
        if part["status"] != "ok":
            lines += ["", f"## {name}: {part['status']}", "", "```", part.get("error", ""), "```"]
    return "\n".join(lines) + "\n"


def run(check: Check, names: list[str], budget_s: float) -> dict:
    """Run the parts `names` in order within `budget_s`, writing the results after each."""
    started = time.perf_counter()
    environment = {
        "device": torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "cpu (rehearsal)",
        "torch": torch.__version__, "python": sys.version.split()[0], "tiny": check.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "budget_s": budget_s,
    }  # fmt: skip
    try:
        import triton

        environment["triton"] = triton.__version__
    except ImportError:
        environment["triton"] = None
    results = {"environment": environment, "parts": {}}
    for name in names:
        function, expected_s = PARTS[name]
        elapsed = time.perf_counter() - started
        if elapsed + expected_s > budget_s:
            results["parts"][name] = {"status": "skipped", "error": f"{elapsed:.0f} s used, about {expected_s:.0f} more "
                                      f"expected, budget {budget_s:.0f} s: run it with --parts {name}"}  # fmt: skip
        else:
            print(f"== {name}", flush=True)
            part_started = time.perf_counter()
            try:
                results["parts"][name] = {"status": "ok", "result": function(check)}
            except Exception:  # one part's failure is a result too; the others still run
                results["parts"][name] = {"status": "failed", "error": traceback.format_exc()[-6000:]}
            results["parts"][name]["seconds"] = time.perf_counter() - part_started
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
        environment["load_average"] = load_average()
        unet_sd15 = results["parts"].get("unet-sd15", {}).get("result") or {}
        results["cuda_auto_min_weights"] = unet_sd15.get("cuda_auto_min_weights")
        (check.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (check.out / "gpu_check.md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the rehearsal, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="small models and sizes (the rehearsal on CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip the parts that would end later (default: 360; --tiny: none)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    args = parser.parse_args(argv)
    names = [name for name in args.parts.split(",") if name]
    unknown = set(names) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(torch.device(args.device), args.tiny, args.out, Path(work))
        budget_s = args.budget_s if args.budget_s is not None else math.inf if args.tiny else 360
        results = run(check, names, budget_s)
    print((args.out / "gpu_check.md").read_text())
    return 0 if all(part["status"] == "ok" for part in results["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
