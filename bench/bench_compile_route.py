"""Issue 22's "inductor" route, bounded from above: the bundled model's DGQ UNet under torch.compile at one fixed
calibrated step, beside FP32 eager and compiled and DGQ's eager fake quantization.

A real generation changes the step at every call, and the step decides the activation groups' layout, so dynamo
would compile a graph per step (and gives up after 8). Holding the step fixed gives the most compiling could buy:
if one step's whole graph is not faster than eager, neither is any way of feeding it the steps.

The inputs are those of the first UNet call of a real generation of 16 held-out prompts (guidance 5, so batch 32).
The DGQ UNet's step is set by one call through its step hook; every timed call then goes to `unet.forward`, which
skips the hook, so eager and compiled both run that step. Variants are interleaved round by round
(`common.time_interleaved`); medians are reported with the compile time and how far the compiled output is from
the eager one (inductor reorders float arithmetic, which moves some activation codes by one).

Usage:
    .venv/bin/python bench/bench_compile_route.py --repeats 7 --threads 1 --out runs/bench_compile_route.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import psnr_db  # noqa: E402
from common import machine, median, time_interleaved  # noqa: E402

from dgq_eval import harness  # noqa: E402
from dgq_zoo import bundled_model_dir  # noqa: E402

PROMPTS = 16
DGQ_EAGER, DGQ_COMPILED = "DGQ W8A8 fake, eager", "DGQ W8A8 fake, compiled (one fixed step)"


def first_unet_call(pipe, model: Path) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the first UNet call of a generation of `PROMPTS` held-out prompts."""
    calls: list[tuple[tuple, dict]] = []
    handle = pipe.unet.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        config = harness.EvalConfig(model=str(model), prompts=harness.heldout_prompts(PROMPTS), num_inference_steps=1,
                                    batch_size=PROMPTS)  # fmt: skip
        harness.generate(pipe, config, desc="inputs")
    finally:
        handle.remove()
    args, kwargs = calls[0]
    return args, {**kwargs, "return_dict": False}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/bench_compile_route.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = bundled_model_dir()
    fp = harness.load_model(model)
    dgq = harness.load_model(model.with_name("dgq-shapes-dgq"), "fake")
    call_args, call_kwargs = first_unet_call(fp, model)
    dgq.unet(*call_args, **call_kwargs)  # through the step hook: the step every later `forward` runs

    forwards = {
        "PyTorch FP32 eager": fp.unet.forward,
        "PyTorch FP32 compiled": torch.compile(fp.unet.forward),
        DGQ_EAGER: dgq.unet.forward,
        DGQ_COMPILED: torch.compile(dgq.unet.forward),
    }
    compile_s, outputs = {}, {}
    for name, forward in forwards.items():
        started = time.perf_counter()
        outputs[name] = forward(*call_args, **call_kwargs)[0]
        if "compiled" in name:
            compile_s[name] = time.perf_counter() - started
    times = time_interleaved({name: (lambda f=f: f(*call_args, **call_kwargs)) for name, f in forwards.items()},
                             args.repeats, warmup=1)  # fmt: skip
    fp32_eager = median(times["PyTorch FP32 eager"])
    rows = {
        name: {
            "median_s": median(seconds),
            "x_fp32_eager": fp32_eager / median(seconds),
            "compile_s": compile_s.get(name),
            "all_s": seconds,
        }
        for name, seconds in times.items()
    }
    rows[DGQ_COMPILED]["psnr_vs_eager_db"] = psnr_db(outputs[DGQ_COMPILED], outputs[DGQ_EAGER])
    results = {"machine": machine(), "unet_input_shape": list(call_args[0].shape), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["machine"]))
    print("\n| variant | s/call | × FP32 eager | compile s |\n|---|---|---|---|")
    for name, row in rows.items():
        compiled = "" if row["compile_s"] is None else f"{row['compile_s']:.0f}"
        print(f"| {name} | {row['median_s']:.3f} | {row['x_fp32_eager']:.2f} | {compiled} |")
    print(f"\ncompiled vs eager DGQ output: {rows[DGQ_COMPILED]['psnr_vs_eager_db']:.1f} dB")


if __name__ == "__main__":
    main()
