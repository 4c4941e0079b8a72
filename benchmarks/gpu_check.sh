#!/usr/bin/env bash
# GPU check (issue #20 part 5): generation s/image (fp32/fp16/bf16, SDPA vs xformers, torch.compile), training
# img/s and peak memory (cached vs encoded latents, full vs LoRA, FSDP and DeepSpeed ZeRO-2 launches) on one GPU,
# printed as one markdown table in at most 8 minutes. docs/gpu_check.md says how to run it on a lent GPU.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine; extra arguments go to gpu_check.py
#   bash benchmarks/gpu_check.sh --smoke      # tiny sizes on the CPU (what tests/test_gpu_check.py runs)
#
# Writes the table to stdout and, when $OUT is set (the device tool's output folder), gpu_check.md (stdout),
# gpu_check.json (rows + versions) and gpu_check.log (the workers' output) there.
set -uo pipefail
cd "$(dirname "$0")/.."

# Wheels carried to a machine that lacks packages (docs/gpu_check.md): installed apart from the machine's own
# Python, ahead of it on the path, as the device notes prescribe. --no-deps: every needed wheel is carried.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, not installed
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
# gpu_check.py keeps to its own --budget (450 s); the timeout is the backstop that keeps the call under 8 minutes
timeout -k 5 "${GPU_CHECK_TIMEOUT:-470}" python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" \
    | tee "$out/gpu_check.md"
