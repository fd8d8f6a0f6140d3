"""`--count instructions`: instructions retired (callgrind's Ir) by one call of each implementation.

Wall-clock on a shared VM moves by tens of percent; instruction counts do not, so they show what a
change to a kernel did. The parent re-runs the bench CLI under
`valgrind --tool=callgrind --collect-atstart=no --instr-atstart=no`, one valgrind process per ISA variant with all
the selected cases in it (importing torch under valgrind takes a minute or two, so that cost is
paid once per variant). The child, seeing it runs on valgrind, builds each case at the --quick
sizes and, per implementation, makes two uncounted warm-up calls (first-call work: lazy init,
allocator growth, dispatcher caches) and one counted call between `_C.callgrind_start()` and
`_C.callgrind_stop(name)`. Each stop writes a numbered dump file whose `desc: Trigger: Client
Request: <name>` line names the call and whose `summary:` / `totals:` line holds its Ir.

One thread (OMP_NUM_THREADS=1, torch threads 1) keeps OpenMP regions in the calling thread, so the
count is the whole call's, and PYTHONHASHSEED=0 keeps Python's own work the same run to run.
"""
from __future__ import annotations

import gc
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

# Variants valgrind cannot run: its CPUID hides AVX-512 (no release up to 3.2x emulates it), so
# pyeccv, ATen, oneDNN and MKL would all fall back and the count would not be that variant's.
VALGRIND_CANNOT = {"avx512": "valgrind does not emulate AVX-512 (its CPUID hides it)"}

_TRIGGER = re.compile(r"^desc:\s*Trigger:\s*Client Request:\s*(.*?)\s*$", re.M)
_TOTAL = re.compile(r"^(summary|totals):\s*(\d+)", re.M)
_PART = re.compile(r"^part:\s*(\d+)", re.M)


def parse_dump(text: str) -> Optional[Tuple[int, str, int]]:
    """(part number, client-request name, Ir) of one callgrind dump; None for a dump not made by
    a client request (the one at program termination). `summary:` is preferred, `totals:` is the
    fallback; with several events the first column is Ir (the only event collected here)."""
    m = _TRIGGER.search(text)
    if m is None:
        return None
    found = {k: int(v) for k, v in _TOTAL.findall(text)}
    if not found:
        raise ValueError(f"callgrind dump for {m.group(1)!r} has no summary: or totals: line")
    part = _PART.search(text)
    return (int(part.group(1)) if part else 0, m.group(1), found.get("summary", found.get("totals")))


def parse_dump_dir(path: str) -> List[Tuple[int, str, int]]:
    """All client-request dumps of a run (files cg.out.<pid>.<n>), in the order they were made."""
    got = []
    for f in glob.glob(os.path.join(path, "cg.out.*")):
        with open(f, errors="replace") as fh:
            d = parse_dump(fh.read())
        if d is not None:
            got.append(d)
    return sorted(got)


def call_name(case: str, impl: str) -> str:
    return f"{case}/{impl}"


# ---- the child, under valgrind -----------------------------------------------------------------
def count_here(selected, count_all: bool, json_path: Optional[str], argv: List[str], progress) -> int:
    """Runs inside valgrind: two warm-ups and one counted call of each implementation."""
    import torch

    from .. import _backend
    from ._core import Row, stamp_rows, write_json

    C = _backend.C()
    torch.set_num_threads(1)
    want = os.environ.get("PYECCV_CPU_ISA")
    if want and want != "auto" and _backend.cpu_isa() != want:  # pyeccv rejects this at import; be sure
        print(f"error: variant {want!r} not in use under valgrind (got {_backend.cpu_isa()!r})", file=sys.stderr)
        return 3
    rows: List[Row] = []
    for case in selected:
        if "cpu" not in case.devices:
            continue
        spec = case.build("cpu", True)
        if spec is None:
            continue
        got: List[Row] = []
        for impl in spec.impls:
            if not (count_all or impl.kind == "pyeccv"):
                continue
            name = call_name(case.name, impl.name)
            progress(f"callgrind {case.core}/{name} [{_backend.cpu_isa()}] ...")
            r = Row(case.core, case.name, "cpu", impl.name, impl.kind, None, params=spec.params, note=impl.note)
            try:
                # two uncounted warm-ups: the first does the one-time work (lazy init, dispatcher
                # and allocator caches), the second leaves the allocator in its steady state
                impl.fn()
                impl.fn()
            except Exception as e:  # reported, no dump made
                r.status = f"error: {e}"[:120]
                got.append(r)
                continue
            # a cyclic-GC pass landing inside one run's counted call and not the other's would
            # make the counts differ: collect now, and keep the collector off while counting
            gc.collect()
            gc.disable()
            C.callgrind_start()
            try:
                impl.fn()
                r.status = "counted"
            except Exception as e:
                r.status = f"error: {e}"[:120]
            finally:
                C.callgrind_stop(name)  # a dump is made either way: keeps the dumps and rows in step
                gc.enable()
            r.params = dict(spec.params, dump=name)
            got.append(r)
        stamp_rows(got, "cpu")
        rows += got
    if json_path:
        write_json(json_path, rows, ["bench"] + argv, {"counted_under_valgrind": bool(C.running_on_valgrind())})
    return 0


# ---- the parent --------------------------------------------------------------------------------
def unavailable_reason() -> Optional[str]:
    """Why instruction counting cannot run here, or None."""
    from .. import _backend

    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install valgrind)"
    if not _backend.has_native() or not bool(_backend.C().callgrind_available()):
        return ("pyeccv._C was built without valgrind/callgrind.h: install valgrind's headers "
                "(e.g. the valgrind package) and rebuild pyeccv")
    return None


def default_variant() -> Tuple[str, Optional[str]]:
    """The variant counted without --isa: the one in use, unless valgrind cannot run it."""
    from .. import _backend

    cur = _backend.cpu_isa()
    if cur not in VALGRIND_CANNOT:
        return cur, None
    for v in _backend.available_cpu_isas():
        if v not in VALGRIND_CANNOT:
            return v, f"note: counting {v}, not {cur}: {VALGRIND_CANNOT[cur]}"
    raise RuntimeError("no variant this CPU runs can run under valgrind")


def run_counts(variants: List[str], mode: str, child_argv: List[str], progress) -> Dict[str, Any]:
    """One valgrind process per variant; returns {"rows", "variants", "rc"} like _isa.run_variants,
    with Row.instructions filled from the dumps."""
    from ._core import Row
    from ._isa import peer_env

    rows: List[Row] = []
    info: Dict[str, Any] = {}
    rc = 0
    for v in variants:
        if v in VALGRIND_CANNOT:
            print(f"skipping {v}: {VALGRIND_CANNOT[v]}", file=sys.stderr)
            info[v] = {"skipped": VALGRIND_CANNOT[v]}
            continue
        extra = peer_env(v, mode)
        env = dict(os.environ, **extra, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
        with tempfile.TemporaryDirectory(prefix="pyeccv-cg-") as tmp:
            out = os.path.join(tmp, "rows.json")
            log = os.path.join(tmp, "valgrind.log")
            # --instr-atstart=no: no instrumentation (the slow part) until the first
            # callgrind_start(), which starts it; the import of torch then runs ~3x faster
            cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--instr-atstart=no",
                   f"--callgrind-out-file={os.path.join(tmp, 'cg.out.%p')}", f"--log-file={log}",
                   sys.executable, "-m", "pyeccv", "bench", *child_argv, "--json", out]
            progress(f"isa {v}: valgrind ... (importing torch under valgrind takes a minute or two)")
            code = subprocess.call(cmd, env=env)
            rc = max(rc, code)
            if code != 0 or not os.path.exists(out):
                with open(log, errors="replace") as f:
                    tail = f.read()[-2000:]
                print(f"error: the valgrind run for {v} failed (exit {code}); valgrind log tail:\n{tail}",
                      file=sys.stderr)
                info[v] = {"env": extra, "rc": code, "error": "valgrind run failed"}
                rc = max(rc, 1)
                continue
            with open(out) as f:
                doc = json.load(f)
            got = [Row.from_dict(d) for d in doc["results"]]
            dumps = parse_dump_dir(tmp)
        counted = [r for r in got if r.params.get("dump")]
        if len(dumps) != len(counted):
            print(f"error: {v}: {len(dumps)} callgrind dumps for {len(counted)} counted calls", file=sys.stderr)
            rc = max(rc, 1)
        for r, (_, name, ir) in zip(counted, dumps):
            if name != r.params["dump"]:  # callgrind numbers dumps in order: a mismatch is a bug
                print(f"error: dump {name!r} where {r.params['dump']!r} was expected", file=sys.stderr)
                rc = max(rc, 1)
                continue
            if r.status == "counted":
                r.instructions = ir
        rows += got
        info[v] = {"env": extra, "rc": code, "machine": doc.get("machine")}
    return {"rows": rows, "variants": info, "rc": rc}


def count_table(rows) -> str:
    head = ["case", "impl", "kind", "isa", "instructions (Ir)", "status"]
    body = [[r.case, r.impl, r.kind, r.isa or "-", "-" if r.instructions is None else f"{r.instructions:,}", r.status]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
