"""Access: hashed API keys (`dgq-hash-key`), per-key rate limits (in-process and shared through a real Redis),
`/metrics` on its own port or behind its own key, CORS off by default, and no secret in the logs of a real
`dgq-serve` started with keys and a password-protected Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import free_port, running_api
from local_cluster import console_script
from pydantic import ValidationError
from test_deploy import running_serve

from service.auth import hash_api_key, key_id
from service.config import Settings
from service.queue import keys
from service.ratelimit import RedisRateLimiter

pytestmark = pytest.mark.anyio

KEY_A, KEY_B = "key-a-0123456789abcdefghij", "key-b-0123456789abcdefghij"
REQUEST = {"prompt": "a red square", "steps": 2, "seed": 7}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def run(command: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([console_script(command), *args], input=stdin, capture_output=True, text=True, timeout=120)


# --- keys at rest ---


def test_plain_text_keys_are_refused_without_echoing_them(tmp_path):
    with pytest.raises(ValidationError) as refused:
        Settings(api_keys=f"{hash_api_key(KEY_A)}, {KEY_B}", _env_file=None)
    message = str(refused.value)
    assert "api_keys entries [2]" in message and "dgq-hash-key" in message and KEY_B not in message

    env = {name: value for name, value in os.environ.items() if not name.startswith(("DGQ_", "REDIS_URL"))}
    refused_start = subprocess.run(  # cwd: no stray .env
        [console_script("dgq-serve")], env=env | {"DGQ_API_KEYS": KEY_B}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )
    assert refused_start.returncode == 2
    assert "plain-text keys" in refused_start.stderr and "dgq-hash-key" in refused_start.stderr
    assert KEY_B not in refused_start.stderr + refused_start.stdout
    assert "Traceback" not in refused_start.stderr


def test_hash_key_cli():
    hashed = run("dgq-hash-key", stdin=KEY_A + "\n")
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_api_key(KEY_A)
    assert Settings(api_keys=hashed.stdout.strip(), _env_file=None).api_key_hashes() == [hash_api_key(KEY_A)]
    weak = run("dgq-hash-key", stdin="hunter2\n")
    assert weak.returncode == 2 and "at least 20" in weak.stderr and "--generate" in weak.stderr
    generated = run("dgq-hash-key", "--generate")
    key, key_hash = generated.stdout.split()
    assert len(key) >= 40 and key_hash == hash_api_key(key)


# --- rate limits ---


async def test_rate_limit_per_key_in_process(embedded_settings):
    embedded_settings.embedded_worker = False
    embedded_settings.api_keys = [hash_api_key(KEY_A), hash_api_key(KEY_B)]
    embedded_settings.rate_limit_per_minute, embedded_settings.rate_limit_burst = 120, 3  # 2 per second
    async with running_api(embedded_settings, wait_ready=False) as client:
        assert (await client.get("/v1/models")).status_code == 401, "no key: 401, and no token taken"
        codes = [(await client.get("/v1/models", headers=bearer(KEY_A))).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = await client.get("/v1/models", headers=bearer(KEY_A))
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert "120 requests per minute (bursts of 3)" in limited.json()["detail"]
        assert (await client.get("/v1/models", headers=bearer(KEY_B))).status_code == 200, "each key its own bucket"
        assert (await client.get("/healthz")).status_code == 200, "probes are not limited"
        await asyncio.sleep(0.6)
        assert (await client.get("/v1/models", headers=bearer(KEY_A))).status_code == 200, "refilled"


async def test_rate_limit_without_keys_is_per_client_address(embedded_settings):
    embedded_settings.embedded_worker = False
    embedded_settings.rate_limit_per_minute, embedded_settings.rate_limit_burst = 1, 1
    async with running_api(embedded_settings, wait_ready=False) as client:
        assert (await client.get("/v1/models")).status_code == 200
        limited = await client.get("/v1/models")
        assert limited.status_code == 429 and 55 <= int(limited.headers["retry-after"]) <= 60
        assert "for this client" in limited.json()["detail"]


async def test_rate_limit_is_shared_by_api_replicas_through_redis(embedded_settings, redis_url):
    """Two API processes' apps on one Redis draw from one bucket per key: burst 4 at 6/min allows 4 in all."""
    embedded_settings.redis_url, embedded_settings.embedded_worker = redis_url, False
    embedded_settings.api_keys = [hash_api_key(KEY_A)]
    embedded_settings.rate_limit_per_minute, embedded_settings.rate_limit_burst = 6, 4
    async with running_api(embedded_settings, wait_ready=False) as api_1, \
            running_api(embedded_settings, wait_ready=False) as api_2:
        answers = [await (api_1, api_2)[n % 2].get("/v1/models", headers=bearer(KEY_A)) for n in range(10)]
    assert [a.status_code for a in answers] == [200] * 4 + [429] * 6
    assert {a.headers["retry-after"] for a in answers[4:]} <= {"9", "10"}
    with redis.Redis.from_url(redis_url) as client:
        bucket = keys.rate_limit(f"key:{key_id(hash_api_key(KEY_A))}")
        assert float(client.hget(bucket, "tokens")) < 1 and 0 < client.pttl(bucket) <= 41_000
        assert KEY_A.encode() not in b"".join(client.keys("*")), "Redis holds no key"


async def test_shared_rate_limits_answer_again_at_once_after_a_redis_restart(redis_server, redis_url):
    """Connections the limiter pooled before Redis restarted are dead; the next request retries on a fresh one
    instead of answering 503."""
    limiter = RedisRateLimiter(redis_url, per_minute=60, burst=4, retry_after_s=1)
    try:
        waits = [await limiter.take("key:a") for _ in range(5)]
        assert waits[:4] == [0] * 4 and waits[4] > 0, waits
        redis_server.stop()
        redis_server.start()  # same port, no persistence: the buckets are gone
        assert await limiter.take("key:a") == 0
    finally:
        await limiter.close()


# --- /metrics ---


async def test_metrics_on_their_own_port(embedded_settings):
    embedded_settings.embedded_worker, embedded_settings.metrics_port = False, 0
    async with running_api(embedded_settings, wait_ready=False) as client:
        on_api = await client.get("/metrics")
        assert on_api.status_code == 404 and "/docs" in on_api.json()["detail"]
        port = client.app.state.metrics_server.server_port
        async with httpx.AsyncClient() as outside:
            scraped = await outside.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200 and "dgq_http_request_duration_seconds" in scraped.text
        assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


async def test_metrics_behind_their_own_key(embedded_settings):
    metrics_key = "metrics-key-0123456789abc"
    embedded_settings.embedded_worker = False
    embedded_settings.api_keys, embedded_settings.metrics_api_keys = [hash_api_key(KEY_A)], [hash_api_key(metrics_key)]
    async with running_api(embedded_settings, wait_ready=False) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer(KEY_A))).status_code == 401, "an API key is not enough"
        scraped = await client.get("/metrics", headers=bearer(metrics_key))
        assert scraped.status_code == 200 and "dgq_queue_depth_jobs" in scraped.text
        assert (await client.get("/v1/models", headers=bearer(metrics_key))).status_code == 401


# --- CORS ---


async def test_cors_off_by_default_and_only_for_allowed_origins(embedded_settings):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    embedded_settings.embedded_worker = False
    async with running_api(embedded_settings, wait_ready=False) as client:
        refused = await client.options("/generate", headers=preflight)
        assert refused.status_code == 405 and "access-control-allow-origin" not in refused.headers
        simple = await client.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers

    embedded_settings.cors_allow_origins = ["https://app.example"]
    async with running_api(embedded_settings, wait_ready=False) as client:
        allowed = await client.options("/generate", headers=preflight | {"Origin": "https://app.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers
        other = await client.options("/generate", headers=preflight)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        read = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert read.headers["access-control-allow-origin"] == "https://app.example"


# --- secrets in logs ---


def _redis_with_password(data_dir: Path, password: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data_dir), "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, password=password) as client:
                client.ping()
            return process, port
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


def test_no_secrets_in_the_logs_of_startup_and_requests(tiny_sd_model_dir, tmp_path):
    """`dgq-serve` with a Redis password, API keys and a rate limit; keys right and wrong, a 429, a 413: the log
    has every request line and none of the secrets."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    password, wrong_key = "redis-pw-Xq7Zt0pSecret", "wrong-key-0123456789abcdefg"
    redis_process, port = _redis_with_password(tmp_path, password)
    env = {"DGQ_MODEL": str(tiny_sd_model_dir), "DGQ_QUANTIZED": "none", "DGQ_EMBEDDED_WORKER": "true",
           "REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0", "DGQ_API_KEYS": hash_api_key(KEY_A),
           "DGQ_RATE_LIMIT_PER_MINUTE": "60", "DGQ_RATE_LIMIT_BURST": "3", "DGQ_MAX_BODY_BYTES": "2048",
           "DGQ_MAX_UPLOAD_BYTES": "2048"}
    log_file = tmp_path / "serve.log"
    try:
        with running_serve(env, log_file) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
            assert client.post("/generate", json=REQUEST, headers=bearer(KEY_A)).status_code == 200
            assert client.post("/generate", json=REQUEST, headers=bearer(wrong_key)).status_code == 401
            assert client.post("/generate", json=REQUEST | {"prompt": "a" * 4000},
                               headers=bearer(KEY_A)).status_code == 413
            codes = [client.get("/v1/models", headers=bearer(KEY_A)).status_code for _ in range(3)]
            assert 429 in codes
            assert client.get("/metrics").status_code == 200
    finally:
        redis_process.terminate()
        redis_process.wait(timeout=10)
    log = log_file.read_text()
    assert "Application startup complete" in log and log.count('"POST /generate HTTP/1.1"') == 3, log[-3000:]
    for secret in (password, KEY_A, wrong_key):
        assert secret not in log, f"a secret is in the log: {secret}"
