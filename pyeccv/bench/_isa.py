"""`--isa`: the CPU cases once per instruction-set variant, each in a fresh process.

pyeccv picks its kernel variant at import (PYECCV_CPU_ISA), and so do the peers: ATen's vectorised
kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA) and MKL (MKL_ENABLE_INSTRUCTIONS). A
variant's numbers are only meaningful against peers restricted the same way (what a user with
that CPU class sees), so a child process gets both; `--isa-peers native` leaves the peers alone.
Each child reports what the peers really used (effective_peer_isa), since the libraries silently
ignore a value they do not know.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence

import torch

# our variant -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS)
PEER_ENV = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
# what effective_peer_isa() reports when the restriction took effect (aten, dnnl prefix, mkl)
_EXPECTED = {
    "avx512": ("AVX512", "AVX-512", "AVX-512"),
    "avx2": ("AVX2", "AVX2", "AVX2"),
    "baseline": ("DEFAULT", "SSE4.1", "SSE4.2"),
}
PEER_MODES = ("same", "native")


def parse_isa_list(value: str, known: Sequence[str], available: Sequence[str]) -> List[str]:
    """`all` or a comma list -> the variants, best first as in `available`. ValueError (with the
    choices) for an unknown name or one this CPU / build cannot run."""
    if value.strip() == "all":
        return list(available)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--isa needs 'all' or a comma list of {', '.join(known)}")
    for v in names:
        if v not in known:
            raise ValueError(f"--isa: unknown variant {v!r}; choices: all, {', '.join(known)}")
        if v not in available:
            raise ValueError(f"--isa: this CPU / build cannot run {v!r}; available here: all, {', '.join(available)}")
    seen = []
    for v in names:  # keep the user's order, drop repeats
        if v not in seen:
            seen.append(v)
    return seen


def peer_env(variant: str, mode: str) -> Dict[str, str]:
    """Environment of a child: our variant, and the peers' restriction unless mode == "native"."""
    env = {"PYECCV_CPU_ISA": variant}
    if mode == "same":
        env.update(PEER_ENV[variant])
    return env


def strip_options(argv: Sequence[str], drop: Dict[str, bool]) -> List[str]:
    """argv without the options in `drop` (name -> takes a value), in both `--opt v` and `--opt=v`
    form. The parser is built with allow_abbrev=False, so exact names are the only spellings."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in drop:
            i += 1 if ("=" in a or not drop[name]) else 2
            continue
        out.append(a)
        i += 1
    return out


# ---- what the peers really run -----------------------------------------------------------------
def _capture_stdout_fd(fn) -> str:
    """Runs fn with file descriptor 1 redirected to a temporary file and returns what was written
    there: MKL and oneDNN print their verbose lines with C stdio, not through sys.stdout."""
    sys.stdout.flush()
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        libc = None
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            if libc is not None:
                libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", "replace")


def _probe_libraries() -> None:
    a = torch.rand(64, 64)
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        torch.mm(a, a)
    if torch.backends.mkldnn.is_available():
        x, w = torch.rand(1, 3, 8, 8), torch.rand(4, 3, 3, 3)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.mkldnn_convolution(x, w, None, [0, 0], [1, 1], [1, 1], 1)


def parse_peer_verbose(aten: str, text: str) -> Dict[str, str]:
    """The instruction sets in MKL's and oneDNN's verbose header lines, shortened:
    'aten:AVX2 dnnl:AVX2 mkl:AVX2'. A library that printed no header (not linked, or its
    header was already printed in this process) reads '?'."""
    mkl = "?"
    m = re.search(r"MKL_VERBOSE .*? architecture (.*?)(?: enabled processors|, Lnx|$)", text, re.M)
    if m:
        inner = re.findall(r"\(Intel\(R\) ([^)]*)\)", m.group(1))
        mkl = inner[0] if inner else m.group(1).strip()
        if "AMX" in m.group(1):
            mkl += "+AMX"
    dnnl = "?"
    m = re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:(.*)$", text, re.M)
    if m:
        raw = m.group(1).strip()
        dnnl = raw.replace("Intel ", "").split(" with ")[0].replace(" and ", "+").strip()
    return {"aten": aten, "dnnl": dnnl, "mkl": mkl, "summary": f"aten:{aten} dnnl:{dnnl} mkl:{mkl}"}


@functools.lru_cache(maxsize=None)
def effective_peer_isa() -> Dict[str, str]:
    """What ATen, oneDNN and MKL use in this process (one tiny matmul and convolution with their
    verbose mode on), plus 'requested' (the restriction in the environment, if any) and 'ok'."""
    aten = torch.backends.cpu.get_cpu_capability()
    try:
        text = _capture_stdout_fd(_probe_libraries)
    except Exception:  # a probe that fails must not stop the benchmark
        text = ""
    got = parse_peer_verbose(aten, text)
    req = {k: os.environ[k] for k in PEER_ENV["avx2"] if k in os.environ}
    got["requested"] = " ".join(f"{k}={v}" for k, v in req.items())
    got["ok"] = "yes"
    variant = next((v for v, e in PEER_ENV.items() if e == req), None)
    if variant is not None:
        aten_x, dnnl_x, mkl_x = _EXPECTED[variant]
        fine = (got["aten"] == aten_x and (got["dnnl"] == "?" or got["dnnl"].startswith(dnnl_x))
                and (got["mkl"] == "?" or got["mkl"].startswith(mkl_x)))
        if not fine:
            got["ok"] = "NO"
    return got


# ---- the parent: one child per variant ---------------------------------------------------------
def run_variants(variants: List[str], mode: str, child_argv: List[str], progress) -> Dict[str, Any]:
    """Runs `python -m pyeccv bench <child_argv> --json <tmp>` once per variant, streaming its
    output, and returns {"rows": [...Row dicts], "variants": {v: info}, "rc": worst exit code}."""
    from ._core import ENV_CPU_GBPS, ENV_CPU_GFLOPS, Row, bandwidth_gbps, compute_gflops

    # the floor is a property of the machine: measure it once, natively, for every variant
    base_env = dict(os.environ)
    base_env[ENV_CPU_GBPS] = repr(bandwidth_gbps("cpu"))
    base_env[ENV_CPU_GFLOPS] = repr(compute_gflops("cpu"))
    rows: List[Row] = []
    info: Dict[str, Any] = {}
    rc = 0
    with tempfile.TemporaryDirectory(prefix="pyeccv-isa-") as tmp:
        for v in variants:
            extra = peer_env(v, mode)
            env = dict(base_env, **extra)
            out = os.path.join(tmp, f"{v}.json")
            cmd = [sys.executable, "-m", "pyeccv", "bench", *child_argv, "--json", out]
            print(f"\n##### variant {v}: " + " ".join(f"{k}={x}" for k, x in extra.items())
                  + ("" if mode == "same" else " (peers native)"), flush=True)
            progress(f"isa {v}: {' '.join(cmd[1:])}")
            code = subprocess.call(cmd, env=env)
            rc = max(rc, code)
            if not os.path.exists(out):
                info[v] = {"env": extra, "rc": code, "error": "no JSON written"}
                continue
            with open(out) as f:
                doc = json.load(f)
            got = [Row.from_dict(d) for d in doc["results"]]
            rows += got
            info[v] = {"env": extra, "rc": code, "machine": doc.get("machine"),
                       "peer_isa": doc.get("peer_isa")}
    return {"rows": rows, "variants": info, "rc": rc}


def _main_rows(rows) -> List[Any]:
    """The pyeccv rows (the one implementation the summary follows per case)."""
    return [r for r in rows if r.kind == "pyeccv"]


def isa_summary(rows, variants: List[str]) -> str:
    """One line per (case, pyeccv impl), one column group per variant: ms, vs ref, vs best peer,
    then the ratio of each variant's time to the first (best) variant's."""
    from ._core import _fmt

    keys: List[tuple] = []
    by: Dict[tuple, Any] = {}
    for r in _main_rows(rows):
        k = (r.core, r.case, r.impl)
        if k not in by:
            keys.append(k)
        by[k + (r.isa,)] = r
        by.setdefault(k, r)
    head = ["case", "impl"]
    for v in variants:
        head += [f"{v} ms", "vs ref", "vs peer"]
    if len(variants) > 1:
        head += [f"{v}/{variants[0]}" for v in variants[1:]]
    body = []
    for k in keys:
        cells = [k[1], k[2]]
        for v in variants:
            r = by.get(k + (v,))
            mark = "!" if r is not None and r.beats_floor else ""
            cells += [_fmt(r.ms if r else None, ".3f") + mark,
                      _fmt(r.vs_ref if r else None, ".2f") + ("x" if r and r.vs_ref else ""),
                      _fmt(r.vs_peer if r else None, ".2f") + ("x" if r and r.vs_peer else "")]
        first = by.get(k + (variants[0],))
        for v in variants[1:]:
            r = by.get(k + (v,))
            ok = first is not None and r is not None and first.ms and r.ms
            cells.append(_fmt(r.ms / first.ms if ok else None, ".2f") + ("x" if ok else ""))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
