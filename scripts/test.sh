#!/usr/bin/env bash
# The test suite, from a fresh clone: makes .venv-test, installs torch + pyeccv + test tools,
# runs pytest (GPU tests run when a GPU is present, Triton kernels run under the interpreter
# otherwise). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "${PYECCV_VENV:-.venv-test}" requirements/test.txt
exec "${PYECCV_VENV:-.venv-test}/bin/pytest" -p no:cacheprovider "$@"
