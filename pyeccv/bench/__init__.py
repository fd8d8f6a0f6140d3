"""`python -m pyeccv bench [CORE ...] [--device cpu|cuda|auto] [--json FILE] [--quick]
[--isa all|LIST] [--count instructions]`.

Times, per case and in one process, the reference (official code / SciPy), each pyeccv backend
and each installed peer on the same inputs, checks that they agree, and prints ms (median),
speed-up vs the reference and vs the best peer, achieved GB/s, the roofline floor and peak
memory. Each core registers its cases in pyeccv/bench/<core>.py.

The CPU floor is bytes / DRAM bandwidth (STREAM-like, all threads, arrays far beyond the
last-level cache). A case whose working set fits in the cache can legitimately run below it: such
rows say BEATS FLOOR (JSON: beats_floor), and a closing line lists them.

--isa runs the CPU cases once per instruction-set variant of pyeccv's kernels, each in a fresh
process with PYECCV_CPU_ISA set and torch's peers (ATen, oneDNN, MKL) restricted to the same
instruction set (--isa-peers native: unrestricted), and ends with a table per variant.
--count instructions counts, under valgrind's callgrind, the instructions of one call of each
pyeccv implementation (--count-all: every implementation) at the --quick sizes.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import List, Optional

import torch

from . import _callgrind, _isa
from ._core import (Case, Row, beats_floor_line, machine_info, markdown, measure_memory, run_case, stderr_progress,
                    table, write_json)

CORES = ("hungarian", "smooth_ap", "grad_central", "volume_render", "cond_mask_head", "dyn_group_conv")


def cases(core: str) -> List[Case]:
    return list(importlib.import_module(f"pyeccv.bench.{core}").CASES)


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --isa / --count re-run the CLI with some options removed, which needs
    # every option to have exactly one spelling
    p = argparse.ArgumentParser(prog="python -m pyeccv bench", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cores", nargs="*", metavar="CORE", help=f"cores to run (default: all of {', '.join(CORES)})")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (= cpu, and cuda when a GPU is present)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--quick", action="store_true", help="small repeat counts and the quick cases only")
    p.add_argument("--case", action="append", default=[], metavar="SUBSTR",
                   help="only cases whose name contains SUBSTR (repeatable)")
    p.add_argument("--repeat", type=int, default=None, help="max timed repeats per implementation")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--isa", metavar="LIST", default=None,
                   help="CPU kernel variants to run, each in a fresh process: 'all' or a comma list of "
                        f"{', '.join(_isa.PEER_ENV)} (default: only the one in use)")
    p.add_argument("--isa-peers", choices=_isa.PEER_MODES, default="same",
                   help="same (default): restrict ATen / oneDNN / MKL to the variant's instruction set; "
                        "native: leave them unrestricted")
    p.add_argument("--count", choices=("instructions",), default=None,
                   help="count instructions (callgrind Ir) of one call per implementation instead of timing")
    p.add_argument("--count-all", action="store_true",
                   help="with --count: also count the reference and the peers (default: pyeccv only)")
    return p


# options the parent of --isa / --count sets itself for its children (name -> takes a value)
_PARENT_ONLY = {"--isa": True, "--isa-peers": True, "--json": True, "--markdown": True, "--device": True}


def main(argv: List[str]) -> int:
    p = _parser()
    args = p.parse_args(argv)

    cores = args.cores or list(CORES)
    for c in cores:
        if c not in CORES:
            p.error(f"unknown core {c!r}; known: {', '.join(CORES)}")
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.device.split(",")]
        for d in devices:
            if d not in ("cpu", "cuda"):
                p.error(f"--device must be cpu, cuda or auto, got {d!r}")
            if d == "cuda" and not torch.cuda.is_available():
                p.error("--device cuda: no CUDA GPU is visible to torch")
    variants: Optional[List[str]] = None
    if args.isa is not None:
        from .. import _backend

        try:
            variants = _isa.parse_isa_list(args.isa, list(_backend.CPU_ISAS), _backend.available_cpu_isas())
        except ValueError as e:
            p.error(str(e))
        if "cpu" not in devices:
            p.error("--isa selects CPU kernel variants: it needs --device cpu (or auto)")
    if args.count_all and not args.count:
        p.error("--count-all needs --count instructions")

    selected = []
    for core in cores:
        for case in cases(core):
            # counting runs at the quick sizes, so it takes the quick cases too (see _callgrind)
            if (args.quick or args.count) and not case.quick:
                continue
            if args.case and not any(s in case.name for s in args.case):
                continue
            selected.append(case)
    if args.list:
        for case in selected:
            print(f"{case.core}/{case.name}{'' if case.quick else '  (full only)'}")
        return 0

    if args.count:
        return _count(args, argv, selected, variants)
    if variants is not None:
        return _by_variant(args, argv, selected, devices, variants)
    rows, rc = _run_here(args, selected, devices)
    return _finish(args, argv, rows, rc)


def _child_argv(argv: List[str], quick: bool) -> List[str]:
    """The children's arguments: this run's, minus the options the parent handles, CPU only."""
    out = _isa.strip_options(argv, _PARENT_ONLY) + ["--device", "cpu"]
    return out + (["--quick"] if quick and "--quick" not in out else [])


def _header(devices: List[str], quick: bool, label: str = "") -> None:
    info = machine_info()
    print("pyeccv bench | " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if "cpu" in devices:
        peer = _isa.effective_peer_isa()
        print(f"peers' ISA: {peer['summary']}" + (f" (requested {peer['requested']})" if peer["requested"] else ""))
        if peer["ok"] != "yes":
            print("WARNING: the peers did not take the requested instruction-set restriction", file=sys.stderr)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} | devices {label or ','.join(devices)} | quick={quick}")


def _run_here(args, selected: List[Case], devices: List[str]):
    """Times the selected cases in this process; returns (rows, exit code)."""
    _header(devices, args.quick)
    print("ms = median; 'vs ref' / 'vs peer' = that time / this time (higher is faster);"
          " floor = bytes that must move / measured DRAM bandwidth (STREAM-like, all threads)\n")
    rows: List[Row] = []
    done = []
    jobs = [(c, d) for d in devices for c in selected if d in c.devices]
    t0 = time.perf_counter()
    for k, (case, dev) in enumerate(jobs, 1):
        prefix = f"[{k}/{len(jobs)} {time.perf_counter() - t0:6.1f}s] "
        got, spec = run_case(case, dev, args.quick, lambda m: stderr_progress(prefix + m), args.repeat)
        if got:
            print(table(got) + "\n", flush=True)
            done.append((got, spec, dev))
        rows += got
    # peak memory: a second pass after every timing (the CPU measurement changes malloc's behaviour)
    stderr_progress(f"[{time.perf_counter() - t0:6.1f}s] measuring peak memory ...")
    for got, spec, dev in done:
        measure_memory(got, spec, dev)
    if rows:
        print("=== all cases, with the peak memory of one call\n" + table(rows))
    return rows, 0


def _by_variant(args, argv: List[str], selected: List[Case], devices: List[str], variants: List[str]) -> int:
    """--isa: the CPU cases in one child per variant; CUDA cases (if any) here, once."""
    rows: List[Row] = []
    rc = 0
    if "cuda" in devices:
        got, rc = _run_here(args, selected, ["cuda"])
        rows += got
    else:
        _header([], args.quick, f"cpu, one process per variant: {', '.join(variants)}")
    res = _isa.run_variants(variants, args.isa_peers, _child_argv(argv, False), stderr_progress)
    rows += res["rows"]
    print(f"\n=== by CPU variant (pyeccv; peers {'restricted to the same ISA' if args.isa_peers == 'same' else 'native'};"
          " '!' = beats its floor; last columns: time / the first variant's time)")
    for v in variants:
        got = next((r.peer_isa for r in res["rows"] if r.isa == v and r.peer_isa), "?")
        print(f"  {v}: peers ran {got}")
    print(_isa.isa_summary(res["rows"], variants))
    return _finish(args, argv, rows, max(rc, res["rc"]), {"isa_variants": res["variants"]})


def _count(args, argv: List[str], selected: List[Case], variants: Optional[List[str]]) -> int:
    """--count instructions: in the parent, one valgrind child per variant; in that child (it
    runs on valgrind), the counting itself."""
    from .. import _backend

    if _backend.has_native() and _backend.C().running_on_valgrind():
        return _callgrind.count_here(selected, args.count_all, args.json, ["bench"] + argv, stderr_progress)
    why = _callgrind.unavailable_reason()
    if why:
        print(f"error: --count instructions needs valgrind and a pyeccv built with callgrind.h: {why}",
              file=sys.stderr)
        return 2
    if variants is None:
        v, note = _callgrind.default_variant()
        if note:
            print(note, file=sys.stderr)
        variants = [v]
    _header([], True, f"cpu under callgrind, one process per variant: {', '.join(variants)}")
    res = _callgrind.run_counts(variants, args.isa_peers, _child_argv(argv, True), stderr_progress)
    print("\n=== instructions of one call (callgrind Ir, one thread, --quick sizes, after two warm-up calls)")
    print(_callgrind.count_table(res["rows"]))
    rc = res["rc"]
    if args.json:
        write_json(args.json, res["rows"], ["bench"] + argv, {"isa_variants": res["variants"]})
    bad = [r for r in res["rows"] if r.kind == "pyeccv" and r.status.startswith("error")]
    if bad:
        print("error: " + ", ".join(f"{r.case}/{r.impl}: {r.status}" for r in bad), file=sys.stderr)
        rc = max(rc, 1)
    return rc


def _finish(args, argv: List[str], rows: List[Row], rc: int, extra=None) -> int:
    """JSON, Markdown, the BEATS FLOOR line and the exit code (1 on a pyeccv mismatch)."""
    if args.json:
        extra = dict(extra or {})
        if any(r.device == "cpu" for r in rows) and "isa_variants" not in extra:  # else: per variant
            extra.setdefault("peer_isa", _isa.effective_peer_isa())
        write_json(args.json, rows, ["bench"] + argv, extra)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    line = beats_floor_line(rows)
    if line:
        print("\n" + line)
    bad = [r for r in rows if r.kind == "pyeccv" and (r.status.startswith("MISMATCH") or r.status.startswith("error"))]
    if bad:
        print("MISMATCH: " + ", ".join(f"{r.case}/{r.impl}: {r.status}" for r in bad), file=sys.stderr)
        return 1
    return rc
