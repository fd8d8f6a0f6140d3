# Shared by scripts/test.sh and scripts/bench.sh: make a venv with torch and pyeccv in it.
# Usage: source scripts/_venv.sh VENV_DIR REQUIREMENTS_FILE
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$1
REQS=$2
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch: the CPU build where there is no GPU (pinned, from local disk on our machines); any
# torch >= 2.4 where a GPU is present (PYECCV_TORCH overrides, e.g. PYECCV_TORCH=torch==2.11.0).
if [ -n "${PYECCV_TORCH:-}" ]; then
  TORCH_REQ=("$PYECCV_TORCH")
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_REQ=("torch>=2.4")
else
  TORCH_REQ=(-r "$REPO/requirements/cpu-torch.txt")
fi
"${PIP[@]}" install "${TORCH_REQ[@]}" -r "$REQS"
# pyeccv itself, built in an isolated environment (no torch needed to build). CUDA kernels are
# compiled when nvcc is on PATH, for PYECCV_CUDA_ARCHS (default 80;90a).
"${PIP[@]}" install "$REPO"
