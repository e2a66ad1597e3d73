#!/usr/bin/env bash
# The one prepared command for a lent GPU: bench/gpu_check.py's docstring says what it measures and which wheels .whl/
# must hold. From the repository root, with the device tool:
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=450)
# Arguments go to gpu_check.py (e.g. --parts unet-sdxl). Everything it writes lands in $OUT.
set -o pipefail
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    > "$out/nvidia-smi.txt" 2>&1
python3 bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
