#!/usr/bin/env bash
# The benchmark CLI, from a fresh clone: makes .venv-bench, installs torch + pyeccv + the peers,
# and runs `python -m pyeccv bench` on this machine (CPU, and CUDA too when a GPU is present).
# Extra arguments go to the CLI, e.g. --quick, --json out.json, hungarian --case dino.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "${PYECCV_VENV:-.venv-bench}" requirements/bench.txt
cd /tmp  # import the installed package, not the source tree
exec "$OLDPWD/${PYECCV_VENV:-.venv-bench}/bin/python" -m pyeccv bench "$@"
