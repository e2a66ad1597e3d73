"""Deployment files, checked without a Docker engine or a cluster.

- docker-compose.yml against the Compose spec (`docker-compose config`, Debian package docker-compose) and its wiring;
- the Dockerfile's instructions, and the package its `pip install --no-deps .` installs (built as a wheel here):
  the bundled model with its pre-quantized checkpoint, which 'auto' serves without quantizing at startup;
- .env.example against `Settings`;
- deploy/k8s against the Kubernetes OpenAPI schemas (kubernetes-validate) and the queue's stream/group names;
- deploy/prometheus with `promtool` (Debian package prometheus);
- every metric the dashboard and the alert rules query exists in the /metrics of a running `dgq-serve`, and a real
  Prometheus scraping that process answers the request count.
Each check that needs a binary skips with the package to install when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port
from local_cluster import console_script
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.config import Settings
from service.queue import keys

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dgq-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S = DEPLOY / "k8s"
GENERATE = {"prompt": "a red square", "steps": 2, "seed": 3, "width": 16, "height": 16}


@contextlib.contextmanager
def running_serve(env: dict[str, str], log_file: Path, timeout_s: float = 240) -> Iterator[str]:
    """`dgq-serve` (embedded queue and worker) on a free port; yields its base URL once /readyz answers 200."""
    port = free_port()
    child_env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DGQ_REDIS_URL")}
    child_env |= {"DGQ_HOST": "127.0.0.1", "DGQ_PORT": str(port), "DGQ_TORCH_THREADS": "1",
                  "DGQ_WARMUP_STEPS": "1", "DGQ_BATCH_WINDOW_S": "0.01", **env}
    with log_file.open("wb") as log:
        # cwd: the log's directory, so that no stray .env is read.
        process = subprocess.Popen([console_script("dgq-serve")], cwd=log_file.parent, env=child_env, stdout=log,
                                   stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"dgq-serve exited:\n{log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"dgq-serve not ready:\n{log_file.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_documents(path):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _expressions(node: object) -> list[str]:
    """Every `expr` in a dashboard or rule file, depth first."""
    if isinstance(node, dict):
        return [value for key, value in node.items() if key == "expr"] + [
            expr for value in node.values() for expr in _expressions(value)]
    if isinstance(node, list):
        return [expr for value in node for expr in _expressions(value)]
    return []


def _dashboard_expressions() -> list[str]:
    return _expressions(json.loads(DASHBOARD.read_text()))


def _alert_expressions() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]}


def _metric_names(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\b(dgq_[a-z0-9_]+)", expr)}


def _queried_metric_names() -> set[str]:
    """Names of series that the dashboard's and the alert rules' expressions select."""
    expressions = _dashboard_expressions() + list(_alert_expressions().values())
    assert expressions
    return _metric_names(expressions)


# --- docker-compose.yml, Dockerfile, .env.example ---


def test_compose_file_follows_the_compose_spec(tmp_path):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose): no Compose spec validator")
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    result = subprocess.run([compose, "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_wiring():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"redis", "api", "worker", "worker-second", "prometheus", "grafana"}
    assert all("healthcheck" in service for service in services.values())

    redis_command = services["redis"]["command"]
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])

    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "ports" not in worker, "a published host port would make `--scale worker=N` collide"
    assert "container_name" not in worker, "a fixed container name allows one replica only"
    # Prometheus finds the API by name and every worker replica through compose's DNS, on the ports they listen on.
    scrape = {job["job_name"]: job for job in
              yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape["dgq-api"]["static_configs"][0]["targets"] == [f"api:{services['api']['environment']['DGQ_PORT']}"]
    (dns,) = scrape["dgq-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker", "worker-second"]
    assert dns["port"] == int(worker["environment"]["DGQ_WORKER_METRICS_PORT"])
    # the second model's workers: the same worker, told its model, only with their profile
    second = services["worker-second"]
    assert second["profiles"] == ["second-model"] and second["command"] == worker["command"]
    assert second["environment"] == worker["environment"] | {"DGQ_WORKER_MODEL": "${SECOND_WORKER_MODEL:-}"}
    assert second["deploy"] == worker["deploy"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["environment"]["DGQ_REDIS_URL"] == "redis://redis:6379/0"
        assert any(volume.endswith(":/var/cache/dgq") for volume in services[name]["volumes"])

    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS_VIEWER:-false}"


def test_env_example_covers_every_setting_and_validates(monkeypatch):
    text = (REPO / ".env.example").read_text()
    mentioned = set(re.findall(r"^#? ?(DGQ_[A-Z0-9_]+)=", text, re.MULTILINE))
    fields = {f"DGQ_{name.upper()}" for name in Settings.model_fields}
    assert fields - mentioned == set(), "settings missing from .env.example"
    assert mentioned - fields == {"DGQ_IMAGE", "DGQ_MODELS_DIR", "DGQ_API_PORT"}, "unknown DGQ_* names"
    example = re.search(r"^# DGQ_MODELS=(.*)$", text, re.MULTILINE).group(1)
    served = Settings(models=json.loads(example), worker_model="", _env_file=None).served_models
    assert list(served) == [re.search(r"^# DGQ_WORKER_MODEL=(.*)$", text, re.MULTILINE).group(1),
                            re.search(r"^# SECOND_WORKER_MODEL=(.*)$", text, re.MULTILINE).group(1)]

    compose_variables = set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO / "docker-compose.yml").read_text()))
    assert compose_variables <= set(re.findall(r"^#? ?([A-Z0-9_]+)=", text, re.MULTILINE))

    for line in text.splitlines():
        if line.startswith("DGQ_"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.model == "bundled" and settings.quantized == "auto" and settings.device == "cuda:0"
    assert settings.api_keys == [] and settings.max_batch == 4


def _dockerfile_instructions() -> list[str]:
    lines = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text()).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_layers_user_and_healthcheck():
    instructions = _dockerfile_instructions()
    index = dict(enumerate(instructions))

    def first(prefix: str) -> int:
        return next(i for i, line in index.items() if line.startswith(prefix))

    assert re.match(r"FROM nvidia/cuda:[\d.]+-runtime-", instructions[0])
    torch_install = first("RUN pip install \"torch==")
    assert "--index-url \"${TORCH_INDEX_URL}\"" in index[torch_install]
    assert any(line.startswith("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for line in instructions)
    # The same torch release as the Makefile's CPU pin, in its CUDA build.
    makefile_pin = re.search(r"TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={makefile_pin}" in instructions
    # Dependencies before code: torch, then the requirements of pyproject.toml, then the packages.
    requirements = first("RUN python3 -c \"import tomllib")
    assert torch_install < requirements < first("COPY dgq_core") < first("RUN pip install --no-deps .")
    users = [line for line in instructions if line.startswith("USER ")]
    assert users and users[-1] != "USER root"
    assert "/healthz" in index[first("HEALTHCHECK")]
    assert instructions[-1] == 'CMD ["dgq-serve"]'

    # The user the containers run as owns the directories the volumes are mounted on (quantize cache, hub cache).
    user = users[-1].split()[1]
    cache_env = index[first("ENV DGQ_QUANTIZED_CACHE_DIR=")]
    assert "HF_HOME=" in cache_env
    assert f"chown -R {user}:{user} \"$DGQ_QUANTIZED_CACHE_DIR\" \"$HF_HOME\"" in index[first("RUN mkdir -p")]

    # Everything the COPY lines name is in the build context that .dockerignore lets through.
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for line in instructions:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert source.rstrip("/") in allowed and (REPO / source).exists(), source


def test_image_package_holds_the_bundled_model_and_its_checkpoint(tmp_path):
    """What the image's `pip install --no-deps .` installs: a wheel built from the Docker build context. The bundled
    model, its pre-quantized checkpoint and the playground files must all be in it, and with DGQ_QUANTIZED=auto the
    installed bundled model resolves to that checkpoint without quantizing anything at startup."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    copied = [line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    for name in copied:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
        archive.extractall(tmp_path / "site")

    shipped = [f"dgq_zoo/{name}" for name in ("dgq-shapes", "dgq-shapes-dgq")]
    shipped += ["service/static", "service/assets", "dgq_core/data"]
    needed = {path.relative_to(context).as_posix() for folder in shipped for path in (context / folder).rglob("*")
              if path.is_file()}
    assert "dgq_zoo/dgq-shapes-dgq/unet/diffusion_pytorch_model.safetensors" in needed
    assert needed - packaged == set(), "files the image would lack (pyproject.toml package-data)"

    cache = tmp_path / "cache"
    cache.mkdir()
    probe = ("from service.config import Settings; from service.served_model import quantized_checkpoint; "
             "print(quantized_checkpoint(Settings(_env_file=None, model='bundled', quantized='auto')))")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DGQ_")}
    env |= {"PYTHONPATH": str(tmp_path / "site"), "DGQ_QUANTIZED_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "site" / "dgq_zoo" / "dgq-shapes-dgq"
    assert list(cache.iterdir()) == [], "the bundled model was quantized at startup"


# --- Kubernetes ---


def test_k8s_manifests_follow_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
    custom = {"ScaledObject", "PodMonitor"}  # CRDs: no schema at hand, checked field by field below
    validated = 0
    for (kind, name), doc in _k8s_objects().items():
        if kind in custom:
            continue
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kind} {name}: {error.message} at {list(error.path)}")
        validated += 1
    assert validated == 7  # Namespace, ConfigMap, Redis StatefulSet + Service, API Deployment + Service, workers


def test_k8s_wiring_matches_the_service():
    objects = _k8s_objects()
    settings = objects[("ConfigMap", "dgq-settings")]["data"]

    worker = objects[("Deployment", "dgq-worker")]["spec"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["terminationGracePeriodSeconds"] > float(settings["DGQ_REQUEST_TIMEOUT_S"])

    api = objects[("Deployment", "dgq-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"

    scaled = objects[("ScaledObject", "dgq-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "dgq-worker" and scaled["minReplicaCount"] == 1
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == keys.jobs_stream(settings["DGQ_MODEL"]) and meta["consumerGroup"] == keys.WORKER_GROUP
    assert int(meta["lagCount"]) == int(settings["DGQ_MAX_BATCH"])
    # KEDA 2.11+ refuses a lagCount trigger without activationLagCount (parseRedisStreamsMetadata).
    assert int(meta["activationLagCount"]) >= 0
    host, port = meta["address"].split(":")
    assert host.split(".")[:2] == ["redis", "dgq-serve"] and ("Service", "redis") in objects
    assert settings["DGQ_REDIS_URL"] == f"redis://redis:{port}/0"

    ports = {port["name"] for kind_name in (("Deployment", "dgq-api"), ("Deployment", "dgq-worker"))
             for port in objects[kind_name]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    monitored = {endpoint["port"] for endpoint in objects[("PodMonitor", "dgq-serve")]["spec"]["podMetricsEndpoints"]}
    assert monitored == ports == {"http", "metrics"}

    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# --- Prometheus and Grafana ---


def test_promtool_checks_config_and_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_every_metric_of_the_service():
    defined = {metric._name for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)}
    assert len(defined) >= 20
    shown = {re.sub(r"_(bucket|count|sum|total|info)$", "", name) for name in _metric_names(_dashboard_expressions())}
    assert defined - shown == set(), "metrics without a dashboard panel"


# What the dashboard must show (issue: deploy and watch it), each as a pattern some panel query matches.
DASHBOARD_VIEWS = {
    "requests/s by route": r"sum by \(route\) \(rate\(dgq_http_request_duration_seconds_count",
    **{f"p{q} latency by route": rf"histogram_quantile\(0\.{q}, sum by \(le, route\) "
                                  r"\(rate\(dgq_http_request_duration_seconds_bucket" for q in ("5", "95", "99")},
    "queue depth": r"dgq_queue_depth_jobs",
    "queue lag": r"dgq_queue_consumer_lag_jobs",
    "queue wait time": r"histogram_quantile\(.*dgq_queue_wait_seconds_bucket",
    "batch size": r"dgq_batch_size_images_(sum|bucket)",
    "text encode time": r"dgq_text_encode_seconds_sum",
    "denoise time": r"dgq_denoise_seconds_sum",
    "decode time": r"dgq_decode_seconds_sum",
    "images/s": r"^sum\(rate\(dgq_batch_size_images_sum(\{[^}]*\})?\[",
    "jobs by outcome": r"sum by \(outcome\) \(rate\(dgq_jobs_total",
    "weight bytes by precision": r"by \([^)]*\bprecision\b[^)]*\) \(dgq_model_weight_bytes",
    "RSS per process": r"^dgq_process_resident_memory_bytes$",
    "GPU memory per worker": r'^dgq_cuda_memory_(allocated|peak)_bytes\{job="dgq-worker"\}$',
    "jobs by mode and sampler": r"sum by \(mode, scheduler\) \(rate\(dgq_jobs_submitted_total",
    "preview decode time": r"histogram_quantile\(.*dgq_preview_decode_seconds_bucket",
}

# The alerts the issue asks for: each needs a rule whose expression matches.
ALERT_CONDITIONS = {
    "workers down": r'up\{job="dgq-worker"\} == 0',
    "queue lag growing": r"deriv\(dgq_queue_consumer_lag_jobs",
    "p95 latency over a threshold": r"histogram_quantile\(0\.95,.*dgq_http_request_duration_seconds_bucket.*\) > \d",
    "error rate": r'dgq_http_request_duration_seconds_count\{status=~"5\.\."\}',
    "dead-letter growth": r"increase\(dgq_jobs_dead_lettered_total",
    "GPU memory near the limit": r"dgq_cuda_memory_peak_bytes.*>.*dgq_cuda_memory_total_bytes",
}


def test_dashboard_and_alerts_cover_what_the_issue_asks_for():
    dashboard = [" ".join(expr.split()) for expr in _dashboard_expressions()]
    missing = [view for view, pattern in DASHBOARD_VIEWS.items()
               if not any(re.search(pattern, expr) for expr in dashboard)]
    assert missing == [], "dashboard views missing"
    alerts = [" ".join(expr.split()) for expr in _alert_expressions().values()]
    missing = [alert for alert, pattern in ALERT_CONDITIONS.items()
               if not any(re.search(pattern, expr) for expr in alerts)]
    assert missing == [], "alert rules missing"


def test_dashboard_selects_the_model():
    """A `model` variable lists the served models, and every query of a metric that carries the `model` label
    filters on it."""
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model" and "label_values(dgq_model_info, model)" in variable["definition"]
    labelled = {metric._name for metric in vars(metrics).values()
                if isinstance(metric, MetricWrapperBase) and "model" in metric._labelnames}
    assert len(labelled) >= 15
    for expr in _dashboard_expressions():
        for name, selector in re.findall(r"\b(dgq_[a-z0-9_]+?)(?:_bucket|_sum|_count)?(\{[^}]*\})?[\[)\s]", expr + " "):
            if re.sub(r"_(total|info)$", "", name) in labelled:
                assert 'model=~"$model"' in selector, expr


def test_grafana_provisioning_wiring():
    """The dashboard's datasource is the provisioned one, and the files lie where compose mounts them."""
    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    # Container path -> repository directory, for the bind mounts of the repository's files.
    mounted = {volume.split(":")[1]: REPO / volume.split(":")[0] for volume in grafana["volumes"]
               if volume.startswith("./")}
    (datasource,) = yaml.safe_load(
        (mounted["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"

    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for node in [panel, *panel.get("targets", [])]:
            if node.get("datasource") is not None:
                used.add((node["datasource"]["type"], node["datasource"]["uid"]))
    assert used == {("prometheus", datasource["uid"])}
    assert all(target.get("expr") for panel in dashboard["panels"] for target in panel.get("targets", []))

    (provider,) = yaml.safe_load(
        (mounted["/etc/grafana/provisioning"] / "dashboards" / "dgq-serve.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounted[dashboards_dir].resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounted[dashboards_dir] / Path(home).relative_to(dashboards_dir)).resolve() == DASHBOARD


@pytest.fixture(scope="module")
def served(tiny_sd_model_dir, tmp_path_factory) -> Iterator[str]:
    """A running `dgq-serve` on the tiny model that has generated one image."""
    log_file = tmp_path_factory.mktemp("deploy-serve") / "serve.log"
    with running_serve({"DGQ_MODEL": str(tiny_sd_model_dir), "DGQ_QUANTIZED": "none"}, log_file) as base_url:
        response = httpx.post(base_url + "/generate", json=GENERATE, timeout=120)
        assert response.status_code == 200, response.text
        yield base_url


def test_healthchecks_pass_on_a_running_service_and_fail_without_one(served):
    """The image's HEALTHCHECK command (DGQ_PORT pointed at the running `dgq-serve`) and compose's API healthcheck
    (its port swapped for the running one), run as Docker would run them; both must fail on a closed port."""
    port = served.rsplit(":", 1)[1]
    closed = str(free_port())
    healthcheck = next(line for line in _dockerfile_instructions() if line.startswith("HEALTHCHECK "))
    command = healthcheck.split(" CMD ", 1)[1]  # shell form: Docker runs it with /bin/sh -c
    for tried, expected in ((port, 0), (closed, 1)):
        result = subprocess.run(["/bin/sh", "-c", command], env=os.environ | {"DGQ_PORT": tried},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == expected, (tried, result.stderr[-500:])

    test = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD" and "127.0.0.1:8000/healthz" in test[-1]
    for tried, expected in ((port, 0), (closed, 1)):
        argv = [*test[1:-1], test[-1].replace(":8000/", f":{tried}/")]
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == expected, tried


def test_every_metric_the_dashboard_and_alerts_query_is_exported(served):
    exported = {sample.name for family in text_string_to_metric_families(httpx.get(served + "/metrics").text)
                for sample in family.samples}
    queried = _queried_metric_names()
    assert len(queried) >= 20
    assert queried - exported == set(), "queried but not exported by dgq-serve"


def test_real_prometheus_scrapes_dgq_serve(served, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    # The shipped config with its rules, the compose targets swapped for the running process.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"] = [{"job_name": "dgq-api", "static_configs": [{"targets": [served.split("//")[1]]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def prometheus_data(path: str, **params):
        """The `data` of a Prometheus API answer; raises HTTPStatusError while it still starts up (503, text body)."""
        response = httpx.get(f"{api}/{path}", params=params, timeout=5)
        response.raise_for_status()
        return response.json()["data"]

    query = 'sum(dgq_http_request_duration_seconds_count{job="dgq-api", route="/generate", status="200"})'
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus returned no request count"
            with contextlib.suppress(httpx.HTTPError):
                result = prometheus_data("query", query=query)["result"]
                rules = prometheus_data("rules")["groups"]
                evaluated = [rule for group in rules for rule in group["rules"] if rule["health"] != "unknown"]
                if result and len(evaluated) == sum(len(group["rules"]) for group in rules):
                    break
            time.sleep(0.5)
        assert float(result[0]["value"][1]) == 1.0  # the one POST /generate of the fixture
        assert {rule["name"]: rule["health"] for rule in evaluated} == {rule["name"]: "ok" for rule in evaluated}
        firing = prometheus_data("query", query="ALERTS")["result"]
        assert [alert["metric"]["alertname"] for alert in firing] == [], "an idle healthy service raises no alert"
    finally:
        process.terminate()
        process.wait(timeout=30)
