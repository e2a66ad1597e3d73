"""The large fuzz run of the HTTP API: every operation of its OpenAPI schema, valid, invalid and valid-but-extreme
requests (at the served model's limits and one step past them), against a real uvicorn server; counts the answers
by status and error type, and fails on any 5xx or unclear 4xx (tests/fuzz_api.py holds the checks;
tests/test_bad_input.py runs a smaller one in the suite).

Serves what the suite's fuzz serves (tests/fuzz_api.py `fuzz_settings`): the tests' tiny random model built in a
temporary directory, its embedded worker with memory for one 32x32 image but not two.

Usage:
    .venv/bin/python bench/bench_fuzz.py --examples 100 --json runs/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_api import fuzz, fuzz_settings, serve_in_thread, tight_memory  # noqa: E402
from local_cluster import free_port  # noqa: E402
from tiny_models import build_tiny_sd  # noqa: E402

from bench.common import load_average  # noqa: E402
from service.api.app import create_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="examples per operation and mode")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(fuzz_settings(build_tiny_sd(Path(tmp) / "tiny-sd")))
        with serve_in_thread(app, free_port()) as base_url:
            tight_memory(app)
            started = time.monotonic()
            with tqdm(desc="operations", unit="op") as bar:
                answers = fuzz(base_url, args.examples, progress=lambda label: (bar.set_postfix_str(label),
                                                                                bar.update(1)))
            seconds = time.monotonic() - started
    figures = {
        "requests": sum(answers.values()), "seconds": round(seconds, 1),
        "answers": dict(sorted(answers.items())), "server_errors": sum(n for a, n in answers.items() if a[0] == "5"),
        "examples_per_operation_and_mode": args.examples, "load_average_after": load_average(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
