"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a running server: valid and invalid
requests for every operation, and valid-but-extreme ones, at the served model's limits (`/v1/models`) and one step
past them: sizes, steps, image counts, guidance at its bounds, seeds, image indices of a real job.

Importable without pytest: tests/test_bad_input.py runs a small fuzz, bench/bench_fuzz.py a large one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import schemathesis
import uvicorn
from conftest import TINY_BYTES_PER_ROW_PIXEL, budget_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from service.config import Settings

SEED_MAX = 2**63 - 1
MAX_BODY_BYTES = 4096
MAX_UPLOAD_BYTES = 65536
AT_THE_LIMITS = "at the limits"
"""The third kind of generated request, beside schemathesis' positive and negative modes."""


def fuzz_settings(model_dir: Path) -> Settings:
    """The fuzzed API: a model (the tests' tiny one), its embedded worker, caps small enough that every image a
    fuzzed request may ask for takes milliseconds."""
    return Settings(
        model=str(model_dir), quantized="none", warmup_steps=1, batch_window_s=0.01, max_width=32, max_height=32,
        max_steps=2, max_num_images=2, max_prompt_chars=300, max_body_bytes=MAX_BODY_BYTES,
        max_upload_bytes=MAX_UPLOAD_BYTES, max_input_pixels=64 * 64, queue_max=256, result_ttl_s=60, _env_file=None,
    )


def tight_memory(app) -> None:
    """Give the app's embedded worker memory for one 32x32 image but not two, so that extreme requests meet the
    memory refusal too."""
    [worker] = app.state.service.workers
    budget_for(worker, 32, 32, 1, 30.0, bytes_per_row_pixel=TINY_BYTES_PER_ROW_PIXEL)


@contextlib.contextmanager
def serve_in_thread(app, port: int, ready_timeout_s: float = 120) -> Iterator[str]:
    """Run `app` on a real uvicorn server on 127.0.0.1:`port` in a thread until /readyz answers 200; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not become ready"
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def clear_error_body(ctx, response, case) -> None:
    """Every 4xx is JSON saying what is wrong: `detail`, `type`, and the OpenAI-shaped `error` with the status."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert body["detail"] and body["type"], body
        assert body["error"]["code"] == response.status_code and body["error"]["message"] == body["detail"], body
    if response.status_code in (429, 503):
        assert int(response.headers["retry-after"]) >= 1


def extreme_values(limits: dict[str, int]) -> dict[str, st.SearchStrategy]:
    """Per request field, values at the model's limits, at the static bounds, and one step past either."""
    sides = st.sampled_from(sorted({8, limits["max_width"], limits["max_height"], limits["max_width"] + 8,
                                    limits["max_height"] + 8, 2**31}))
    return {
        "width": sides, "height": sides,
        "size": st.tuples(sides, sides).map(lambda wh: f"{wh[0]}x{wh[1]}"),
        "steps": st.sampled_from([1, limits["max_steps"], limits["max_steps"] + 1]),
        "num_images": st.sampled_from([1, limits["max_num_images"], limits["max_num_images"] + 1]),
        "n": st.sampled_from([1, limits["max_num_images"], limits["max_num_images"] + 1]),
        "guidance_scale": st.sampled_from([1.0, 30.0, 30.000001, 0.999999]),
        "seed": st.sampled_from([0, SEED_MAX, SEED_MAX + 1]),
    }


def at_the_limits(operation, body_fields: set[str], limits: dict[str, int], job_ids: list[str]) -> st.SearchStrategy:
    """Valid requests of `operation` with each extreme-able field of its body (`body_fields`) replaced, at random,
    by an extreme value; path parameters name a real job (and the images around its count) as often as random ones."""
    extremes = {field: values for field, values in extreme_values(limits).items() if field in body_fields}

    def apply(case, draw_fields, job_id, index):
        body = case.body
        if isinstance(body, dict):
            body = body | draw_fields
        path = dict(case.path_parameters or {})
        if "job_id" in path and job_id is not None:
            path["job_id"] = job_id
        if "index" in path:
            path["index"] = index
        return operation.Case(body=body, path_parameters=path, query=case.query, headers=case.headers,
                              media_type=case.media_type)

    fields = st.fixed_dictionaries({}, optional=extremes)
    job = st.sampled_from([*job_ids, None])
    index = st.sampled_from([-1, 0, 1, limits["max_num_images"], SEED_MAX])
    return st.tuples(operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE), fields, job, index
                     ).map(lambda drawn: apply(*drawn))


def corner_cases(operation, body_fields: set[str], limits: dict[str, int]) -> list:
    """The corners of a generation request, each once: smallest and largest sides, one and the most images, the most
    steps, the highest guidance; and the largest image one step past the model's limits."""
    sides = [8, limits["max_width"]]
    cases = []
    for width, height, images in [*itertools.product(sides, sides, [1, limits["max_num_images"]]),
                                  (limits["max_width"] + 8, limits["max_height"], 1)]:
        if {"width", "height", "num_images"} <= body_fields:
            body = {"width": width, "height": height, "num_images": images}
        elif {"size", "n"} <= body_fields:
            body = {"size": f"{width}x{height}", "n": images}
        else:
            return []
        body |= {"prompt": "a red square", "steps": limits["max_steps"], "guidance_scale": 30.0, "seed": SEED_MAX}
        cases.append(operation.Case(body=body, media_type="application/json"))
    return cases


def body_fields(openapi: dict, method: str, path: str) -> set[str]:
    """The property names of an operation's JSON body in the OpenAPI document (none without a body)."""
    body = openapi["paths"][path][method.lower()].get("requestBody", {})
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        schema = openapi["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    return set(schema.get("properties", {}))


def fuzz(base_url: str, examples: int, progress=None) -> Counter[str]:
    """Call every operation of the server's schema `examples` times in each mode (positive, negative, at the
    limits), checking that no answer is a 5xx and every 4xx is a clear error body; the answers counted by status
    and, for errors, type ("200", "422 InsufficientMemory", ...).

    Args:
        base_url (`str`): the running server.
        examples (`int`): examples per operation and mode.
        progress (`Callable[[str], None] | None`): called with each operation's label before it runs.
    """
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    openapi = httpx.get(base_url + "/openapi.json").json()
    [model] = httpx.get(base_url + "/v1/models").json()["data"]
    job = httpx.post(base_url + "/generate", json={"prompt": "a red square", "width": 8, "height": 8, "steps": 1,
                                                   "num_images": 2, "seed": 1}, timeout=120)
    assert job.status_code == 200, job.text
    job_ids = [job.headers["x-job-id"]]
    answers: Counter[str] = Counter()
    for operation in [result.ok() for result in schema.get_all_operations()]:
        if progress:
            progress(operation.label)
        strategies = {mode.value: operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode}
        fields = body_fields(openapi, operation.method, operation.path)
        strategies[AT_THE_LIMITS] = at_the_limits(operation, fields, model["limits"], job_ids)

        def check(case) -> None:
            response = case.call(base_url=base_url, timeout=120)
            error_type = response.json().get("type") if response.status_code >= 400 else None
            answers[f"{response.status_code} {error_type}" if error_type else str(response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error, clear_error_body])

        for case in corner_cases(operation, fields, model["limits"]):
            check(case)
        for mode, strategy in strategies.items():

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def call(case) -> None:
                check(case)

            try:
                call()
            except Unsatisfiable:
                # an operation without parameters or body has no invalid input to generate
                assert mode == schemathesis.GenerationMode.NEGATIVE.value, operation.label
    return answers
