"""Does `pytest -m method` catch a one-line change to each of the method's equations? (issue 17's bar)

Each mutation below changes one line of `dgq_core`: one equation or rule of DGQ (Eq. 1, K-means groups, group
ranges, Eq. 3, Eq. 8, the step keying, the code variants, Table 3's static scale) or of its weight recipe (the range
search's norm, AdaRound's soft rounding, regularizer and schedule, the reconstruction loss, statistics from the
quantized model). The tracked files are copied to a temporary directory, the unchanged copy must pass
`pytest -m method`, and then each mutation is applied there alone and must make it fail; the working tree is never
touched. A mutation no test catches is reported as missed, with the rest.

Usage:
    .venv/bin/python bench/method_mutations.py --out runs/method_mutations.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One line of `path` changed: `before` (which must occur exactly once) becomes `after`."""

    what: str
    path: str
    before: str
    after: str

    def apply(self, source: str) -> str:
        """`source` (the text of `path`) with the change made; ValueError when `before` is not in it exactly once
        (the source moved on: update the mutation)."""
        if source.count(self.before) != 1:
            raise ValueError(f"{self.path}: {self.before!r} must occur exactly once; update MUTATIONS")
        return source.replace(self.before, self.after)


MUTATIONS = (
    Mutation("Eq. 1: D_d without the minima's spread", "dgq_core/grouping.py",
             "return float((hi.max() - hi.min()) + (lo.max() - lo.min()))", "return float(hi.max() - hi.min())"),
    Mutation("Eq. 1: the axis with the smaller D_d chosen", "dgq_core/grouping.py",
             "return max(AXES, key=lambda axis:", "return min(AXES, key=lambda axis:"),
    Mutation("K-means on the maxima only", "dgq_core/grouping.py",
             "points = torch.cat((lo, hi)).T", "points = torch.cat((hi, hi)).T"),
    Mutation("group range: the largest member minimum", "dgq_core/grouping.py",
             "group_lo[g] = lo[members].min()", "group_lo[g] = lo[members].max()"),
    Mutation("uniform scale over 2^b codes", "dgq_core/quantizers.py",
             "scale = ((hi - lo) / qmax(bits)).clamp_min(MIN_SCALE)",
             "scale = ((hi - lo) / (qmax(bits) + 1)).clamp_min(MIN_SCALE)"),
    Mutation("Eq. 3 uniform: floor instead of round", "dgq_core/quantizers.py",
             "return codes.round_().clamp_(0, qmax(bits))", "return codes.floor_().clamp_(0, qmax(bits))"),
    Mutation("Eq. 3 uniform, compiled kernel: truncation instead of round", "dgq_core/fake_quant_kernel.py",
             "float q = __builtin_rintf(fmaf(x, inverse, zero_point));",
             "float q = __builtin_truncf(fmaf(x, inverse, zero_point));"),
    Mutation("Eq. 3 log: floor instead of round", "dgq_core/quantizers.py",
             "return torch.clamp(torch.round(-torch.log2(ratio)), 0, qmax(bits))",
             "return torch.clamp(torch.floor(-torch.log2(ratio)), 0, qmax(bits))"),
    Mutation("Eq. 3 log, float-bit path: rounding at 1.5 instead of sqrt(2)", "dgq_core/quantizers.py",
             "LOG2_ROUNDING_CARRY = (1 << 23) - 0x3504F4", "LOG2_ROUNDING_CARRY = 1 << 22"),
    Mutation("Eq. 8: <start> inside the scale", "dgq_core/attention.py",
             "return (probs[..., 1:] if keep_start else probs).amax(", "return probs.amax("),
    Mutation("Eq. 8: one scale for the whole batch", "dgq_core/attention.py",
             ".amax(dim=(1, 2, 3), keepdim=True)", ".amax(dim=(0, 1, 2, 3), keepdim=True).expand(probs.shape[0], 1, 1, 1)"),
    Mutation("<start> quantized with the rest", "dgq_core/attention.py",
             "steps_per_octave=LOG_CODE_STEPS_PER_OCTAVE[quantizer], exact_first_column=keep_start)",
             "steps_per_octave=LOG_CODE_STEPS_PER_OCTAVE[quantizer], exact_first_column=False)"),
    Mutation("log-sqrt2 codes as base 2", "dgq_core/attention.py",
             'LOG_CODE_STEPS_PER_OCTAVE = {"log2": 1, "log-sqrt2": 2}', 'LOG_CODE_STEPS_PER_OCTAVE = {"log2": 1, "log-sqrt2": 1}'),
    Mutation("uniform probability codes: step over 2^b", "dgq_core/attention.py",
             "step = (scale / qmax(bits)).clamp_min(", "step = (scale / (qmax(bits) + 1)).clamp_min("),
    Mutation("Table 3 static scale: the worst quantile kept", "dgq_core/attention.py",
             "return min(candidates, key=error).reshape(1)", "return max(candidates, key=error).reshape(1)"),
    Mutation("step keying: a repeated timestep reuses its first call's parameters", "dgq_core/steps.py",
             "self.step = calibrated_step_for(t, self._seen[t], self.calib_timesteps)",
             "self.step = calibrated_step_for(t, 0, self.calib_timesteps)"),
    Mutation("step keying: every call takes step 0's parameters", "dgq_core/layers.py",
             "return min(self.state.step, self.scale.shape[0] - 1)", "return 0"),
    Mutation("weight range search by squared error", "dgq_core/quantizers.py",
             "WEIGHT_SEARCH_NORM = 2.4", "WEIGHT_SEARCH_NORM = 2.0"),
    Mutation("AdaRound: the rectified sigmoid without its shift", "dgq_core/reconstruction.py",
             "return (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)",
             "return (torch.sigmoid(alpha) * (ZETA - GAMMA)).clamp(0, 1)"),
    Mutation("AdaRound: alpha not started at the float weight", "dgq_core/reconstruction.py",
             "return -torch.log((ZETA - GAMMA) / (remainder - GAMMA) - 1)",
             "return torch.zeros_like(remainder)"),
    Mutation("AdaRound: regularizer with a fixed exponent", "dgq_core/reconstruction.py",
             "return (1 - (2 * h - 1).abs().pow(beta)).sum()", "return (1 - (2 * h - 1).abs().pow(2)).sum()"),
    Mutation("AdaRound: no warm-up before the regularizer", "dgq_core/reconstruction.py",
             "return step >= self.warmup * self.iters", "return True"),
    Mutation("AdaRound: beta not annealed", "dgq_core/reconstruction.py",
             "return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)",
             "return self.beta_start"),
    Mutation("AdaRound: hard rounding up only where alpha > 1", "dgq_core/reconstruction.py",
             "up = self.h if self.soft else (self.alpha >= 0).float()",
             "up = self.h if self.soft else (self.alpha >= 1).float()"),
    Mutation("BRECQ loss: squared instead of L2.4", "dgq_core/reconstruction.py",
             "return (output - target).abs().pow(p).sum(1).mean()", "return (output - target).abs().pow(2).sum(1).mean()"),
    Mutation("statistics from the quantized model ignored", "dgq_core/calibration.py",
             "stats = {**stats, **self._quantized_stats(unet, calibrated, stats, weights, progress)}",
             "self._quantized_stats(unet, calibrated, stats, weights, progress)"),
)

PYTEST = [sys.executable, "-m", "pytest", "-m", "method", "-x", "-q", "-p", "no:cacheprovider"]


def copy_tracked_files(destination: Path) -> None:
    """The repository's tracked files (what a fresh clone has), copied to `destination`."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def run_method_tests(copy: Path) -> tuple[bool, str, float]:
    """`pytest -m method` in `copy`: (passed, the first failing test or "", seconds)."""
    began = time.perf_counter()
    done = subprocess.run(PYTEST, cwd=copy, capture_output=True, text=True)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    return done.returncode == 0, failed.group(1) if failed else "", time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/method_mutations.json"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="dgq-mutations-") as tmp:
        copy = Path(tmp)
        copy_tracked_files(copy)
        passed, failed, unchanged_seconds = run_method_tests(copy)
        if not passed:
            raise SystemExit(f"`pytest -m method` fails on the unchanged copy ({failed}): fix that first")
        for mutation in tqdm(MUTATIONS, desc="mutations", unit="mutation"):
            path = copy / mutation.path
            original = path.read_text()
            path.write_text(mutation.apply(original))
            try:
                passed, failed, seconds = run_method_tests(copy)
            finally:
                path.write_text(original)
            results.append({"mutation": mutation.what, "file": mutation.path, "caught": not passed,
                            "first_failure": failed, "seconds": round(seconds, 1)})  # fmt: skip

    missed = [row["mutation"] for row in results if not row["caught"]]
    report = {"machine": machine(), "unchanged_seconds": round(unchanged_seconds, 1), "mutations": results, "missed": missed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| one-line change | file | caught by |\n|---|---|---|")
    for row in results:
        print(f"| {row['mutation']} | `{row['file']}` | {row['first_failure'] or '**missed**'} |")
    print(f"\n{len(results) - len(missed)} of {len(results)} caught; written to {args.out}")


if __name__ == "__main__":
    main()
