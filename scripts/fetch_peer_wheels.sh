#!/usr/bin/env bash
# Downloads the benchmark peers as wheels for the reference GPU machine (Python 3.12, x86_64,
# no index there) into .whl/ (git-ignored), for benchmarks/device_check.sh to install.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  lapx torch-linear-assignment
# nerfacc: pure Python, builds its CUDA code on first use on the GPU machine (ninja + nvcc are there)
python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: nerfacc==0.5.3
ls -l .whl
