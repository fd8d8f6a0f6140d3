"""The package around the ops: build facts, `python -m pyeccv info`, the bench CLI, C++ embedding."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import pyeccv
from pyeccv import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, timeout=300):
    # from /tmp so the installed package is imported, never the source tree
    return subprocess.run([sys.executable, "-m", "pyeccv", *args], cwd="/tmp", capture_output=True, text=True,
                          timeout=timeout)


def test_cuda_kernels_built_when_expected():
    if os.environ.get("PYECCV_EXPECT_CUDA_KERNELS") == "1":
        assert _backend.has_cuda_kernels(), "nvcc was present but _C has no CUDA kernels"
    assert isinstance(_backend.C().build_info(), str)


def test_import_does_not_import_triton():
    code = "import sys, pyeccv; pyeccv.batch_linear_sum_assignment; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/tmp", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info():
    r = run_module("info")
    assert r.returncode == 0, r.stderr
    assert "CUDA kernels in _C" in r.stdout
    for op in ("linear_sum_assignment", "batch_linear_sum_assignment", "detr_match_cost"):
        assert op in r.stdout


def test_bench_cli_smoke(tmp_path):
    out = tmp_path / "b.json"
    r = run_module("bench", "hungarian", "--device", "cpu", "--quick", "--case", "1x16x16", "--repeat", "3",
                   "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "vs ref" in r.stdout and "lsap-1x16x16" in r.stdout
    doc = json.loads(out.read_text())
    kinds = {row["kind"] for row in doc["results"]}
    assert {"reference", "pyeccv"} <= kinds
    assert all(row["status"].startswith("ok") for row in doc["results"] if row["kind"] != "peer")
    assert doc["machine"]["cpu_cores"] >= 1
    r = run_module("bench", "--list")
    assert r.returncode == 0 and "hungarian/dino-16x900x100" in r.stdout
    r = run_module("bench", "nosuchcore")
    assert r.returncode != 0 and "unknown core" in r.stderr


def test_bench_dyn_group_conv_smoke(tmp_path):
    """The DGC bench: the official masked computation, the torch gather path and pyeccv agree; the dense
    and ideal-subset convolutions (other computations, timed as yardsticks) are marked as such."""
    out = tmp_path / "dgc.json"
    r = run_module("bench", "dyn_group_conv", "--device", "cpu", "--quick", "--case", "fwd-B1-", "--repeat", "3",
                   "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "fwd-B1-C256-14x14-g0.25" in r.stdout and "fwd-B1-C256-14x14-g0.5" in r.stdout
    rows = json.loads(out.read_text())["results"]
    assert {row["impl"] for row in rows} == {"official-masked", "dense", "ideal-subset", "torch-gather", "pyeccv"}
    for row in rows:
        want = "n/a (not DGC)" if row["impl"] in ("dense", "ideal-subset") else "ok"
        assert row["status"] == want, row
        assert row["ms"] > 0 and row["params"]["keep"] == round(256 * row["params"]["gate"])
    r = run_module("bench", "dyn_group_conv", "--list")
    assert r.returncode == 0
    for case in ("fwd-B64-C256-14x14-g0.25", "fwd-B64-C128-28x28-g0.5", "layer-B64-C256-14x14-g0.25",
                 "fwd+bwd-B64-C128-28x28-g0.25"):
        assert f"dyn_group_conv/{case}" in r.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cpp_embedding(tmp_path):
    """A C++ project links the torch-free core through find_package(pyeccv) and solves a batch."""
    build = tmp_path / "build"
    env = dict(os.environ)
    cfg = subprocess.run(["cmake", "-S", os.path.join(REPO, "examples", "cpp"), "-B", str(build),
                          f"-DCMAKE_PREFIX_PATH={pyeccv.cmake_prefix_path()}", "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    exe = subprocess.run([str(build / "lsap_example")], capture_output=True, text=True)
    assert exe.returncode == 0, exe.stdout + exe.stderr
    assert "status 0 0" in exe.stdout


def test_headers_are_torch_free():
    for root, _, files in os.walk(os.path.join(REPO, "csrc")):
        for f in files:
            text = open(os.path.join(root, f)).read()
            assert "torch/" not in text and "ATen" not in text and "c10/" not in text, f


def test_readme_examples_run():
    """Every ```python block of the README runs as written."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
