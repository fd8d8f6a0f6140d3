"""The bench CLI's --isa, floor flag and --count instructions machinery (not the kernels' speed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pyeccv import _backend
from pyeccv import bench
from pyeccv.bench import _callgrind, _core, _isa
from pyeccv.bench._core import Case, Impl, Row, Spec

# the smallest CPU case there is: a 16 x 16 assignment, microseconds per call
SMALL = ["hungarian", "--quick", "--case", "lsap-1x16x16"]


def _cli(args, tmp_path, timeout=300, **env):
    """Runs `python -m pyeccv bench ARGS` from tmp_path (so the installed package is imported),
    with the roofline numbers given so that no 3 GiB STREAM measurement runs."""
    e = dict(os.environ, **{_core.ENV_CPU_GBPS: "10.0", _core.ENV_CPU_GFLOPS: "100.0"}, **env)
    return subprocess.run([sys.executable, "-m", "pyeccv", "bench", *args], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=timeout)


# ---- --isa -------------------------------------------------------------------------------------
def test_parse_isa_list():
    known, avail = ["avx512", "avx2", "baseline"], ["avx2", "baseline"]
    assert _isa.parse_isa_list("all", known, avail) == avail
    assert _isa.parse_isa_list("baseline,avx2,baseline", known, avail) == ["baseline", "avx2"]
    with pytest.raises(ValueError, match="unknown variant 'sse9'.*choices: all, avx512, avx2, baseline"):
        _isa.parse_isa_list("avx2,sse9", known, avail)
    with pytest.raises(ValueError, match="cannot run 'avx512'.*available here: all, avx2, baseline"):
        _isa.parse_isa_list("avx512", known, avail)
    with pytest.raises(ValueError):
        _isa.parse_isa_list(",", known, avail)


@pytest.mark.parametrize("value, message", [("foo", "unknown variant 'foo'"), ("avx2,,bar", "unknown variant 'bar'")])
def test_isa_argument_errors(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--isa", value, "--list"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "choices: all, avx512, avx2, baseline" in err


def test_isa_unsupported_on_this_cpu(monkeypatch, capsys):
    monkeypatch.setattr(_backend, "available_cpu_isas", lambda: ["avx2", "baseline"])
    with pytest.raises(SystemExit) as e:
        bench.main(["--isa", "avx512", "--list"])
    assert e.value.code == 2
    assert "cannot run 'avx512'" in capsys.readouterr().err


def test_strip_options():
    drop = bench._PARENT_ONLY
    argv = ["hungarian", "--isa", "all", "--json=x.json", "--quick", "--isa-peers", "native", "--device", "cpu",
            "--case", "lsap"]
    assert _isa.strip_options(argv, drop) == ["hungarian", "--quick", "--case", "lsap"]
    assert bench._child_argv(argv, True) == ["hungarian", "--quick", "--case", "lsap", "--device", "cpu"]


def test_parse_peer_verbose():
    text = ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) "
            "Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors, Lnx 2.60GHz lp64 gnu_thread\n"
            "onednn_verbose,v1,info,cpu,isa:Intel AVX2\n")
    got = _isa.parse_peer_verbose("AVX2", text)
    assert got["summary"] == "aten:AVX2 dnnl:AVX2 mkl:AVX2"
    assert _isa.parse_peer_verbose("DEFAULT", "")["summary"] == "aten:DEFAULT dnnl:? mkl:?"


def test_isa_all_rows(tmp_path):
    out = tmp_path / "r.json"
    p = _cli(["--isa", "all", *SMALL, "--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    variants = _backend.available_cpu_isas()
    assert sorted(doc["isa_variants"]) == sorted(variants)
    rows = doc["results"]
    assert {r["isa"] for r in rows} == set(variants)
    aten = {"avx512": "AVX512", "avx2": "AVX2", "baseline": "DEFAULT"}
    for r in rows:
        assert r["case"] == "lsap-1x16x16" and r["ms"] is not None
        assert r["cpu_model"] and r["cpu_isas"] == ",".join(variants)
        # the peers were restricted like our variant, and the row says what they really ran
        assert r["peer_isa"].startswith(f"aten:{aten[r['isa']]} "), r["peer_isa"]
    assert {r["isa"] for r in rows if r["kind"] == "pyeccv"} == set(variants)
    assert "=== by CPU variant" in p.stdout
    summary = p.stdout.split("=== by CPU variant")[1]
    assert all(f"{v} ms" in summary for v in variants)


# ---- the floor flag ----------------------------------------------------------------------------
def test_beats_floor_rule():
    row = lambda ms, floor: Row("c", "case", "cpu", "pyeccv", "pyeccv", ms, floor_ms=floor)  # noqa: E731
    assert _core.beats_floor(row(1.0, 2.0))
    assert not _core.beats_floor(row(2.0, 1.0))
    assert not _core.beats_floor(row(1.0, 1.0))
    assert not _core.beats_floor(row(None, 1.0))  # did not run
    assert not _core.beats_floor(row(1.0, None))  # no floor


def test_run_case_flags_rows_below_floor(monkeypatch):
    monkeypatch.setitem(_core._BW, "cpu", 10.0)  # GB/s, so no measurement runs

    def build(device, quick):
        import torch

        x = torch.rand(100)
        # claims a terabyte moved: the floor (100 s) is far above any real time
        return Spec([Impl("ref", "reference", lambda: x + 1), Impl("pyeccv", "pyeccv", lambda: x * 2)],
                    bytes=1e12)

    rows, _ = _core.run_case(Case("fake", "tb", build), "cpu", True, lambda m: None, 3)
    assert all(r.beats_floor for r in rows)
    assert all(r.isa == _backend.cpu_isa() and r.peer_isa for r in rows)
    assert "ok, BEATS FLOOR" in _core.table(rows) and "BEATS FLOOR" in _core.markdown(rows)
    line = _core.beats_floor_line(rows)
    assert line.startswith("BEATS FLOOR") and "tb/pyeccv" in line and "last-level cache" in line
    assert _core.beats_floor_line([Row("c", "x", "cpu", "i", "pyeccv", 1.0, floor_ms=0.5)]) is None
    d = Row.from_dict(dict(__import__("dataclasses").asdict(rows[1]), unknown_future_field=1))
    assert d.beats_floor and d.impl == "pyeccv"


def test_stream_sizes():
    llc = _core.llc_bytes()
    assert llc >= 2**20
    per = _core.stream_array_bytes()
    assert per * 3 <= 3 * 2**30 + 2**20
    assert per >= min(256 * 2**20, (3 * 2**30) // 3) or per * 3 * 4 >= (_core._mem_available() or 0) * 0.9


def test_machine_info_has_isa():
    info = _core.machine_info()
    assert info["cpu"] == _backend.cpu_model()
    assert info["cpu_isa"] == _backend.cpu_isa()
    assert info["cpu_isas"] == ",".join(_backend.available_cpu_isas())


# ---- --count instructions ----------------------------------------------------------------------
DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4982
cmd:  python -m pyeccv bench
part: 2


desc: I1 cache: 
desc: D1 cache: 
desc: LL cache: 

desc: Timerange: Basic block 1038702289 - 1038707835
desc: Trigger: Client Request: fwd+bwd-B224/pyeccv Adam(gc)

positions: line
events: Ir
summary: 23350


ob=(1) /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
fn=(0) 0x000000000001ab70
0 23350

totals: 23350
"""


def test_parse_callgrind_dump(tmp_path):
    assert _callgrind.parse_dump(DUMP) == (2, "fwd+bwd-B224/pyeccv Adam(gc)", 23350)
    # no summary line: totals is the fallback
    assert _callgrind.parse_dump(DUMP.replace("summary: 23350\n", ""))[2] == 23350
    # the final dump at exit is not a client request
    assert _callgrind.parse_dump(DUMP.replace("Client Request: fwd+bwd-B224/pyeccv Adam(gc)",
                                              "Program termination")) is None
    with pytest.raises(ValueError, match="no summary"):
        _callgrind.parse_dump(DUMP.replace("summary: 23350", "").replace("totals: 23350", ""))
    (tmp_path / "cg.out.7.2").write_text(DUMP)
    (tmp_path / "cg.out.7.1").write_text(DUMP.replace("part: 2", "part: 1").replace("B224", "B16")
                                         .replace("23350", "99"))
    (tmp_path / "cg.out.7").write_text(DUMP.replace("Client Request: fwd+bwd-B224/pyeccv Adam(gc)", "Program termination"))
    assert _callgrind.parse_dump_dir(str(tmp_path)) == [(1, "fwd+bwd-B16/pyeccv Adam(gc)", 99),
                                                        (2, "fwd+bwd-B224/pyeccv Adam(gc)", 23350)]


def test_count_without_valgrind_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(_callgrind.shutil, "which", lambda name: None)
    assert bench.main(["--count", "instructions", *SMALL]) == 2
    assert "valgrind is not installed" in capsys.readouterr().err


def test_count_all_needs_count(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--count-all", "--list"])
    assert "--count-all needs --count" in capsys.readouterr().err


@pytest.fixture
def slow(request):
    """Runs only when asked for (-m slow, or PYECCV_SLOW=1): each valgrind run imports torch
    under callgrind, a minute or more."""
    if "slow" not in (request.config.getoption("-m") or "") and os.environ.get("PYECCV_SLOW") != "1":
        pytest.skip("slow: run with -m slow or PYECCV_SLOW=1")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_count_is_repeatable(tmp_path, slow):
    if not _backend.C().callgrind_available():
        pytest.skip("pyeccv._C built without valgrind/callgrind.h")
    # three small calls, 20 k to 13 M instructions; they are identical run to run here (two warm-ups
    # settle the allocator), 0.1 % leaves room for a malloc boundary on another machine
    args = ["hungarian", "--case", "lsap-1x16x16", "--case", "lsap-64x100x20", "--case", "detr-64x100x20"]
    counts = []
    for k in range(2):
        out = tmp_path / f"c{k}.json"
        p = _cli(["--count", "instructions", *args, "--json", str(out)], tmp_path, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "instructions (Ir)" in p.stdout
        rows = json.loads(out.read_text())["results"]
        assert len(rows) == 3 and all(r["kind"] == "pyeccv" and r["instructions"] > 0 for r in rows)
        counts.append({(r["case"], r["impl"], r["isa"]): r["instructions"] for r in rows})
    assert counts[0].keys() == counts[1].keys()
    for k, a in counts[0].items():
        assert abs(counts[1][k] - a) <= 1e-3 * a, (k, a, counts[1][k])
