# syntax=docker/dockerfile:1
# dgq-serve on an NVIDIA GPU host: one image for the API (`dgq-serve`, the default command) and the workers
# (`dgq-worker`). Build: docker build -t dgq-serve .
#
# The CUDA runtime base supplies the user-space CUDA libraries the cu128 torch wheel expects next to its own;
# the host's driver is mounted by the NVIDIA container toolkit at run time. Ubuntu 24.04 brings Python 3.12.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc and the Python headers: Triton (which the CUDA torch wheel brings) compiles its kernel launcher at the first
# launch of the fused integer kernel (dgq_core/kernels/triton_fused.py, exec mode "int" on CUDA).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 10001 --user-group dgq

# Layers from the least to the most often changed: torch (CUDA build, by far the largest), then the other
# dependencies read from pyproject.toml, then the code. Editing code rebuilds only the last layers.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The library, the service, and the bundled model (dgq_zoo/dgq-shapes) with its pre-quantized checkpoint; the
# evaluation harness (dgq_eval) stays out of the image.
COPY dgq_core ./dgq_core
COPY dgq_zoo ./dgq_zoo
COPY service ./service
RUN pip install --no-deps .

# Where `DGQ_QUANTIZED=auto` keeps the checkpoints it makes for other models (a volume in docker-compose.yml) and
# where hub models are cached; the dgq user writes both (a fresh named volume takes this directory's owner). The
# bundled model needs neither: its DGQ checkpoint is installed beside it (dgq_zoo/dgq-shapes-dgq, package data),
# and 'auto' takes a checkpoint shipped beside the model before the cache, so the image starts without calibrating.
ENV DGQ_QUANTIZED_CACHE_DIR=/var/cache/dgq \
    HF_HOME=/var/cache/huggingface
RUN mkdir -p "$DGQ_QUANTIZED_CACHE_DIR" "$HF_HOME" \
    && chown -R dgq:dgq "$DGQ_QUANTIZED_CACHE_DIR" "$HF_HOME"

USER dgq
WORKDIR /home/dgq
# Listen on every interface inside the container; run on the GPU. Everything else: see .env.example.
ENV DGQ_HOST=0.0.0.0 \
    DGQ_PORT=8000 \
    DGQ_DEVICE=cuda:0 \
    DGQ_WORKER_METRICS_PORT=9100
EXPOSE 8000 9100

# Liveness of the API process (workers get their own check in docker-compose.yml: they serve /metrics only).
# start-period covers loading the model, and quantizing a model that is not in the cache yet.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/healthz" % os.environ.get("DGQ_PORT", "8000"), timeout=4)'

CMD ["dgq-serve"]
