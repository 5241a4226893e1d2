#!/usr/bin/env bash
# The prepared session for a lent CUDA machine (the device tool): one call, about 7 minutes.
#
#   here, once (needs PyPI):  make gpu-bundle      -> .gpu/wheels (git-ignored): what the image lacks
#   here, before:             bash benchmarks/gpu_session.sh --dry-run      (CPU, tiny, ~3 min)
#   device:                   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=480)
#
# Sections, each under its own `timeout`, each writing its results before the next starts (a
# section that fails or runs out of time loses nothing written before it):
#   1. nvidia-smi and versions; 2. install .gpu/wheels into /tmp/xatl_site (+ an import check);
#   3. benchmarks/gpu_check.py parity (kernels='torch' vs 'triton'); 4. its throughput (+ compiled
#   rows); 5. benchmarks/gpu_trainer.py (XATL run killed and resumed, a distillation run, a
#   plain loop). Everything lands in $OUT (<= 8 files): session.log, gpu_check.md/.json,
#   gpu_trainer.md/.json, logs/xatl.log, logs/distill.log.
# --dry-run: the same sequence on this CPU, tiny shapes, the Triton kernels under the interpreter,
# no wheel install (the venv has everything). Section timeouts: PARITY_TIMEOUT, THROUGHPUT_TIMEOUT,
# TRAINER_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT/logs"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
START=$SECONDS
section() { echo; echo "=== [$((SECONDS - START))s] $*"; }

if [ $DRY = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
  EMU=(--emulate)
  TRAINER=(--dry-run --work /tmp/xatl_gpu_trainer_dry)
  : "${PARITY_TIMEOUT:=300}" "${THROUGHPUT_TIMEOUT:=200}" "${TRAINER_TIMEOUT:=300}"
else
  EMU=()
  TRAINER=(--work /tmp/xatl_gpu_trainer)
  : "${PARITY_TIMEOUT:=90}" "${THROUGHPUT_TIMEOUT:=100}" "${TRAINER_TIMEOUT:=200}"
  # a lease with less time left: PARITY_TIMEOUT=60 THROUGHPUT_TIMEOUT=60 TRAINER_TIMEOUT=125 COMPILE_ROWS=
fi

section "1. machine"
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

section "2. packages"
if [ $DRY = 0 ]; then
  if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_session: .gpu/wheels is empty: run 'make gpu-bundle' here and carry .gpu" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xatl_site \
    .gpu/wheels/*.whl || echo "gpu_session: pip install exited $?"
  export PYTHONPATH="/tmp/xatl_site:$PWD" PATH="/tmp/xatl_site/bin:$PATH"
else
  export PYTHONPATH="$PWD"
fi
IMPORTS="import importlib.metadata as md, deepspeed, transformers, xatl_ds.train, xatl_ds.data, xatl_ds.distill
print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__,
      *(f'{d} {md.version(d)}' for d in ('tokenizers', 'huggingface-hub', 'safetensors', 'pydantic')))"
if ! "$PY" -c "$IMPORTS"; then
  # transformers' import-time version checks (tokenizers, huggingface-hub) may refuse the
  # image's packages: fall back to the image's own transformers rather than lose the session
  echo "gpu_session: the trainer's imports failed; retrying with the image's transformers"
  rm -rf /tmp/xatl_site/transformers /tmp/xatl_site/transformers-*.dist-info
  "$PY" -c "$IMPORTS" || echo "gpu_session: imports still fail: the trainer section will fail"
fi
command -v deepspeed || echo "gpu_session: no deepspeed launcher on PATH"

section "3. gpu_check parity"
timeout "$PARITY_TIMEOUT" "$PY" benchmarks/gpu_check.py --out "$OUT" --skip-throughput "${EMU[@]}"
echo "parity: exit $?"

section "4. gpu_check throughput"
# torch.compile rows (inductor builds, ~30-60 s each) unless COMPILE_ROWS is set empty
timeout "$THROUGHPUT_TIMEOUT" "$PY" benchmarks/gpu_check.py --out "$OUT" --append --skip-parity ${COMPILE_ROWS---compile} \
  --time-budget $((THROUGHPUT_TIMEOUT * 2 / 3)) "${EMU[@]}" | tail -n 25
echo "throughput: exit ${PIPESTATUS[0]}"

section "5. gpu_trainer"
timeout "$TRAINER_TIMEOUT" "$PY" benchmarks/gpu_trainer.py --out "$OUT" "${TRAINER[@]}"
echo "trainer: exit $?"
WORK=${TRAINER[-1]}
for f in xatl distill; do
  [ -f "$WORK/logs/$f.log" ] && tail -c 150000 "$WORK/logs/$f.log" > "$OUT/logs/$f.log"
done
section "done"
ls -la "$OUT" "$OUT/logs"
