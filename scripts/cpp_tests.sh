#!/usr/bin/env bash
# C++ tests of the torch-free core (tests/cpp/core_test.cpp), natively and under emulation:
#   1. native Release build into build/cpp-native, run once per CPU ISA variant this CPU runs
#      (PYECCV_CPU_ISA=<v> for each line of `core_test --list-isas`; one plain run when the core
#      has no ISA API);
#   2. aarch64 cross build into build/cpp-aarch64 (cmake/toolchains/aarch64-linux-gnu.cmake, OpenMP
#      required), run under `qemu-aarch64 -L /usr/aarch64-linux-gnu` - when aarch64-linux-gnu-g++
#      and qemu-aarch64 exist;
#   3. the native x86-64 binary under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512) and
#      `-cpu Nehalem` (SSE4.2, no AVX): the runtime dispatch must pick avx2 / baseline and never
#      execute an instruction the CPU model lacks (qemu kills the run with SIGILL if it does); a
#      variant the model lacks, asked for with PYECCV_CPU_ISA, must be refused.
# Usage: scripts/cpp_tests.sh [--install]
#   --install  apt-get update, then apt-get install -y g++-aarch64-linux-gnu qemu-user, first.
# Every step prints the command it runs; the script goes on after a failed step and exits 1 if any
# step failed (a step whose tools are missing is skipped, not failed).
set -uo pipefail
cd "$(dirname "$0")/.."

JOBS=2
INSTALL=0
for arg in "$@"; do
  case "$arg" in
    --install) INSTALL=1 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cpp_tests.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

NATIVE=build/cpp-native
CROSS=build/cpp-aarch64
TOOLCHAIN="$PWD/cmake/toolchains/aarch64-linux-gnu.cmake"  # absolute: cmake resolves it from the build dir
AARCH64_SYSROOT=/usr/aarch64-linux-gnu
T_START=$SECONDS
summary=()
failed=0

# step NAME CMD...: prints CMD, runs it (stderr merged into stdout, qemu's warnings about CPU-model
# features TCG does not emulate filtered out), records its status and run time.
step() {
  local name=$1
  shift
  echo
  echo "==> $name"
  echo "+ $*"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v "TCG doesn't support requested feature"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    summary+=("ok       $(printf '%4d' "$dt") s  $name")
  else
    summary+=("FAILED   $(printf '%4d' "$dt") s  $name (exit $rc)")
    failed=1
  fi
  return "$rc"
}
skip() {
  echo
  echo "==> $1: skipped ($2)"
  summary+=("skipped         $1 ($2)")
}

# ---- 0. tools -------------------------------------------------------------------------------------
if [ "$INSTALL" -eq 1 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo > /dev/null && SUDO=sudo
  step "apt-get update" $SUDO apt-get update
  step "install cross compiler and qemu-user" \
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y g++-aarch64-linux-gnu qemu-user
fi

# ---- 1. native ------------------------------------------------------------------------------------
native_ok=0
if step "native configure" cmake -S tests/cpp -B "$NATIVE" -DCMAKE_BUILD_TYPE=Release -DPYECCV_TEST_REQUIRE_OPENMP=ON &&
  step "native build" cmake --build "$NATIVE" -j "$JOBS"; then
  native_ok=1
fi
ISA_API=0
if [ "$native_ok" -eq 1 ]; then
  echo
  echo "+ env -u PYECCV_CPU_ISA $NATIVE/core_test --list-isas"
  if isas=$(env -u PYECCV_CPU_ISA "$NATIVE/core_test" --list-isas) && [ -n "$isas" ]; then
    ISA_API=1
    echo "$isas"
    for v in $isas; do
      step "native run, PYECCV_CPU_ISA=$v" env PYECCV_CPU_ISA="$v" "$NATIVE/core_test"
    done
  else
    echo "(no CPU ISA API in this core: one run)"
    step "native run" env -u PYECCV_CPU_ISA "$NATIVE/core_test"
  fi
fi

# ---- 2. aarch64 cross build under qemu ------------------------------------------------------------
if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  skip "aarch64 cross build + qemu-aarch64 run" "aarch64-linux-gnu-g++ or qemu-aarch64 missing; --install adds them"
elif step "aarch64 configure (toolchain file, OpenMP required)" cmake -S tests/cpp -B "$CROSS" \
  -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release -DPYECCV_TEST_REQUIRE_OPENMP=ON &&
  step "aarch64 build" cmake --build "$CROSS" -j "$JOBS"; then
  step "aarch64 run under qemu-aarch64" env -u PYECCV_CPU_ISA qemu-aarch64 -L "$AARCH64_SYSROOT" "$CROSS/core_test"
fi

# ---- 3. native x86-64 binary on older CPU models ------------------------------------------------
if [ "$native_ok" -ne 1 ]; then
  skip "qemu-x86_64 CPU models" "no native build"
elif [ "$(uname -m)" != x86_64 ] || ! command -v qemu-x86_64 > /dev/null; then
  skip "qemu-x86_64 CPU models" "not an x86-64 host or qemu-x86_64 missing; --install adds it"
else
  models=$(qemu-x86_64 -cpu help 2> /dev/null)
  # model: the variant the dispatch must pick there, and a variant it must refuse
  for spec in "Haswell avx2 avx512" "Nehalem baseline avx2"; do
    read -r model pick refuse <<< "$spec"
    if ! grep -qE "^x86 +$model( |$)" <<< "$models"; then
      skip "qemu-x86_64 -cpu $model" "qemu-x86_64 -cpu help does not list $model"
      continue
    fi
    if [ "$ISA_API" -eq 1 ]; then
      step "native binary under qemu-x86_64 -cpu $model (dispatch picks $pick)" \
        env -u PYECCV_CPU_ISA PYECCV_TEST_EXPECT_ISA="$pick" qemu-x86_64 -cpu "$model" "$NATIVE/core_test"
      step "qemu-x86_64 -cpu $model: PYECCV_CPU_ISA=$refuse is refused" \
        env PYECCV_CPU_ISA="$refuse" PYECCV_TEST_EXPECT_ISA=refused qemu-x86_64 -cpu "$model" "$NATIVE/core_test"
    else
      step "native binary under qemu-x86_64 -cpu $model" env -u PYECCV_CPU_ISA qemu-x86_64 -cpu "$model" "$NATIVE/core_test"
    fi
  done
fi

# ---- summary --------------------------------------------------------------------------------------
echo
echo "==> summary ($((SECONDS - T_START)) s in all)"
for line in "${summary[@]}"; do echo "  $line"; done
exit "$failed"
