"""CPU instruction-set variants: PYECCV_CPU_ISA / set_cpu_isa select which compiled variant of every
vectorised C++ kernel runs, and every variant this CPU supports computes the right numbers.

The numerics of each variant are checked by running the C++-path tests of every core (tests/ops,
tests/optim, minus the Triton / torch-fallback / compile / opcheck / distributed cases, which do not
depend on the variant) in a subprocess with PYECCV_CPU_ISA set; the main test run covers "auto".
"""
import os
import subprocess
import sys

import pytest

import pyeccv
from pyeccv import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = _backend.available_cpu_isas()


def _py(code, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd="/tmp", capture_output=True, text=True, env=e,
                          timeout=300)


def test_api_lists_and_switches_variants():
    assert AVAILABLE and AVAILABLE[-1] == "baseline"
    assert set(AVAILABLE) <= set(_backend.compiled_cpu_isas()) <= set(_backend.CPU_ISAS)
    assert pyeccv.cpu_isa() in AVAILABLE
    before = pyeccv.cpu_isa()
    for isa in AVAILABLE:
        with pyeccv.use_cpu_isa(isa):
            assert pyeccv.cpu_isa() == isa
        assert pyeccv.cpu_isa() == before
    with pyeccv.use_cpu_isa("auto"):
        assert pyeccv.cpu_isa() == AVAILABLE[0]
    assert _backend.cpu_model() and isinstance(_backend.cpu_model(), str)


@pytest.mark.parametrize("bad", ["bogus", "AVX2 ", "sse4"])
def test_unknown_variant_raises(bad):
    with pytest.raises(ValueError, match="expected one of auto, avx512, avx2, baseline"):
        pyeccv.set_cpu_isa(bad)
    with pytest.raises(ValueError, match="must be a string"):
        pyeccv.set_cpu_isa(2)


def test_variant_the_cpu_lacks_raises():
    C = _backend.C()
    before = pyeccv.cpu_isa()
    try:
        C._restrict_cpu_isas_for_testing(0b001)  # as on a CPU with SSE2 only
        assert _backend.available_cpu_isas() == ["baseline"]
        assert pyeccv.cpu_isa() == "baseline"  # a selected variant the CPU lost falls back
        for isa in ("avx2", "avx512"):
            if isa in _backend.compiled_cpu_isas():
                with pytest.raises(ValueError, match=f"does not support {isa}; it supports: baseline"):
                    pyeccv.set_cpu_isa(isa)
    finally:
        C._restrict_cpu_isas_for_testing(0b111)
        pyeccv.set_cpu_isa(before)


@pytest.mark.parametrize("isa", AVAILABLE + ["auto"])
def test_environment_variable_selects_variant(isa):
    r = _py("import pyeccv; print(pyeccv.cpu_isa())", {"PYECCV_CPU_ISA": isa})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (AVAILABLE[0] if isa == "auto" else isa)


def test_environment_variable_bad_value_fails_at_import():
    r = _py("import pyeccv", {"PYECCV_CPU_ISA": "avx1024"})
    assert r.returncode != 0
    assert "PYECCV_CPU_ISA" in r.stderr and "expected one of auto, avx512, avx2, baseline" in r.stderr


def test_info_prints_cpu_model_and_variant():
    r = subprocess.run([sys.executable, "-m", "pyeccv", "info"], cwd="/tmp", capture_output=True, text=True,
                       env=dict(os.environ, PYECCV_CPU_ISA="baseline"), timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CPU: "))
    assert _backend.cpu_model() in line and "in use: baseline" in line
    assert ", ".join(AVAILABLE) in line


# the C++-path tests: everything but the cases that never reach a vectorised C++ kernel
NATIVE_ONLY = ("not triton and not torch and not compile and not opcheck and not distributed and not ddp "
               "and not fsdp and not dtensor and not example")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P needs 3.11")
@pytest.mark.parametrize("isa", [v for v in AVAILABLE if v != AVAILABLE[0]])
def test_numerics_of_every_core_on_variant(isa):
    """Every core's C++ kernels against the float64 references, on this variant (the default run
    covers the best one). ~1 minute a variant on 2 cores."""
    env = dict(os.environ, PYECCV_CPU_ISA=isa)
    env.pop("PYTEST_ADDOPTS", None)
    # -P: the repository root must not shadow the installed package (python -m puts cwd first)
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-m", "not slow",
                        "-k", NATIVE_ONLY, "tests/ops", "tests/optim"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    tail = "\n".join(r.stdout.splitlines()[-30:])
    assert r.returncode == 0, f"PYECCV_CPU_ISA={isa}:\n{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
