#!/usr/bin/env bash
# The prepared check for a lent CUDA machine (the device tool): one call, under 10 minutes.
#
#   here, once (needs PyPI):  make gpu-bundle      -> .gpu/ (git-ignored): the mamba-ssm and
#                             causal-conv1d sources and the wheels the GPU image lacks
#   device:                   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#
# Builds the two CUDA extensions for that GPU's architecture only (benchmarks/build_kernels.py),
# then runs benchmarks/gpu_check.py: kernel parity and bf16 throughput. Everything it writes
# lands in $OUT (build.log, check.log, gpu_check.md/.json); record the table in
# benchmarks/GPU_CHECK.md. A failed build still runs the check (torch paths, kernels MISSING).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  echo "gpu_session: .gpu/wheels is empty: run 'make gpu-bundle' here and carry .gpu" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xatl_site .gpu/wheels/*.whl || exit 2
export PYTHONPATH="/tmp/xatl_site:$PWD"
SECONDS=0
timeout "${BUILD_TIMEOUT:-330}" "$PY" benchmarks/build_kernels.py --sdists .gpu/sdists --build /tmp/xatl_kernels \
  >"$OUT/build.log" 2>&1
echo "build: exit $? after ${SECONDS}s; last lines:"; tail -n 3 "$OUT/build.log"
# shellcheck disable=SC1091
[ -f /tmp/xatl_kernels/env.sh ] && source /tmp/xatl_kernels/env.sh
timeout "${CHECK_TIMEOUT:-240}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/check.log"
