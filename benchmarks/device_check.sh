#!/usr/bin/env bash
# One call on a GPU machine (see ../shared/GPU.md): build for sm_90a, GPU tests, compute-sanitizer
# memcheck over every CUDA kernel, the full GPU benchmark; everything under $OUT, summary last.
#   OUT=/some/dir bash benchmarks/device_check.sh            # on the GPU machine
#   OUT=$(mktemp -d) bash benchmarks/device_check.sh --dry-run   # anywhere: GPU steps skipped
# Peer wheels (torch-linear-assignment, lapx, ...) found in .whl/ are installed beside pyeccv.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${PYECCV_SITE:-/tmp/site}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
GPU=0
if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
LOG="$OUT/log.txt"
: > "$LOG"
SUMMARY=()
T0=$(date +%s)

step() {  # step NAME COMMAND...: runs, logs, records status and seconds
  local name=$1; shift
  local t=$(date +%s)
  echo "=== $name: $*" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-10s %-5s %4ss' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL:$rc)" $(( $(date +%s) - t )))")
  return $rc
}
skip() { SUMMARY+=("$(printf '%-10s %-5s %s' "$1" skip "$2")"); echo "=== $1: skipped ($2)" | tee -a "$LOG"; }

# 1. machine and versions
if [ $GPU = 1 ]; then step gpu nvidia-smi; else skip gpu "no GPU (dry run)"; fi
step versions "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
  '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ('triton', 'scipy', 'numpy', 'pybind11', 'scikit_build_core', 'cupy'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'missing')"
command -v nvcc >/dev/null && step nvcc nvcc --version || skip nvcc "not on PATH"

# 2. build for sm_90a into $SITE (no index there: --no-build-isolation --no-deps), plus peer wheels
if [ $GPU = 1 ]; then
  rm -rf "$SITE"
  step build env PYECCV_CUDA_ARCHS=90a PYECCV_WITH_CUDA=ON "$PY" -m pip install --no-index --no-build-isolation \
    --no-deps -q --target "$SITE" "$REPO"
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    step peers "$PY" -m pip install --no-index --no-deps -q --target "$SITE" "$REPO"/.whl/*.whl
  else
    skip peers "no .whl/ wheels"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # nerfacc builds its CUDA code on first use: build it once here, bounded, or leave it out
  if [ -d "$SITE/nerfacc" ]; then
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
    step nerfacc timeout 300 bash -c "cd /tmp && '$PY' -c \"import torch, nerfacc; print(nerfacc.exclusive_sum(torch.ones(4, device='cuda')))\"" \
      || export PYECCV_BENCH_NO_NERFACC=1
  fi
else
  skip build "dry run: uses the pyeccv installed for $PY"
fi
step info bash -c "cd /tmp && '$PY' -m pyeccv info"

# 3. GPU tests, then memcheck over every CUDA kernel (run from /tmp: never the source tree)
step tests bash -c "cd /tmp && '$PY' -m pytest -p no:cacheprovider -x -q -m cuda '$REPO/tests'"
if [ $GPU = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck bash -c "cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 9 '$PY' '$REPO/benchmarks/cuda_smoke.py'"
else
  step smoke bash -c "cd /tmp && '$PY' '$REPO/benchmarks/cuda_smoke.py' --dry-run"
fi

# 4. the full GPU benchmark table
if [ $GPU = 1 ]; then
  step bench bash -c "cd /tmp && '$PY' -m pyeccv bench --device cuda --json '$OUT/bench.json' --markdown '$OUT/bench.md'"
else
  step bench bash -c "cd /tmp && '$PY' -m pyeccv bench --device cpu --quick --case 1x16x16 --json '$OUT/bench.json' --markdown '$OUT/bench.md'"
fi

# 5. summary last
{
  echo
  echo "=== summary ($(( $(date +%s) - T0 ))s, gpu=$GPU, out=$OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
} | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | grep -q FAIL && exit 1
exit 0
