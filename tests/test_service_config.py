"""Settings from environment and CLI, and which quantized checkpoint a deployment serves."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.auth import hash_api_key
from service.config import Settings
from service.served_model import quantized_checkpoint, shipped_quantized_dir


def test_environment_and_cli(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://queue:6379/0")
    hashes = [hash_api_key("first-key-0123456789"), hash_api_key("second-key-0123456789")]
    monkeypatch.setenv("DGQ_API_KEYS", f"{hashes[0]}, {hashes[1]}")
    monkeypatch.setenv("DGQ_MAX_BATCH", "8")
    settings = Settings()
    assert settings.redis_url == "redis://queue:6379/0" and not settings.worker_in_api
    assert settings.api_key_hashes() == hashes and settings.max_batch == 8
    from_cli = Settings(_cli_parse_args=["--max_batch", "2", "--redis_url", "redis://other/1"])
    assert from_cli.max_batch == 2 and from_cli.redis_url == "redis://other/1"
    monkeypatch.delenv("REDIS_URL")
    assert Settings().worker_in_api, "no Redis: the API runs the worker itself"


def _quantized_unet(directory):
    (directory / "unet").mkdir(parents=True)
    (directory / "unet" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "dgq"}}))
    return directory


def test_quantized_checkpoint_resolution(tmp_path):
    model = tmp_path / "shapes"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    assert quantized_checkpoint(Settings(model=str(model), quantized="none")) is None
    assert quantized_checkpoint(Settings(model=str(model), quantized="/ckpt")) == "/ckpt"
    shipped = _quantized_unet(shipped_quantized_dir(model))
    assert shipped == tmp_path / "shapes-dgq"
    assert quantized_checkpoint(Settings(model=str(model), quantized="auto")) == str(shipped)
    already_quantized = _quantized_unet(tmp_path / "q")
    assert quantized_checkpoint(Settings(model=str(already_quantized), quantized="auto")) is None


def test_heartbeats_must_come_well_within_the_worker_ttl():
    assert Settings(heartbeat_interval_s=5, worker_ttl_s=10).heartbeat_interval_s == 5
    with pytest.raises(ValidationError, match="lower heartbeat_interval_s or raise worker_ttl_s"):
        Settings(heartbeat_interval_s=6, worker_ttl_s=10)
    settings = Settings()
    with pytest.raises(ValidationError, match="more than half of worker_ttl_s"):
        settings.worker_ttl_s = 1  # checked on assignment too
