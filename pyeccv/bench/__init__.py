"""`python -m pyeccv bench [CORE ...] [--device cpu|cuda|auto] [--json FILE] [--quick]`.

Times, per case and in one process, the reference (official code / SciPy), each pyeccv backend
and each installed peer on the same inputs, checks that they agree, and prints ms (median),
speed-up vs the reference and vs the best peer, achieved GB/s, the roofline floor and peak
memory. Each core registers its cases in pyeccv/bench/<core>.py.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import List

import torch

from ._core import Case, Row, machine_info, markdown, measure_memory, run_case, stderr_progress, table, write_json

CORES = ("hungarian", "smooth_ap", "grad_central", "volume_render", "cond_mask_head", "dyn_group_conv")


def cases(core: str) -> List[Case]:
    return list(importlib.import_module(f"pyeccv.bench.{core}").CASES)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pyeccv bench", description=__doc__,
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

    selected = []
    for core in cores:
        for case in cases(core):
            if args.quick and not case.quick:
                continue
            if args.case and not any(s in case.name for s in args.case):
                continue
            selected.append(case)
    if args.list:
        for case in selected:
            print(f"{case.core}/{case.name}{'' if case.quick else '  (full only)'}")
        return 0

    info = machine_info()
    print("pyeccv bench | " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} | devices {','.join(devices)} | quick={args.quick}")
    print("ms = median; 'vs ref' / 'vs peer' = that time / this time (higher is faster);"
          " floor = bytes that must move / measured copy bandwidth\n")
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
    if args.json:
        write_json(args.json, rows, ["bench"] + argv)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    bad = [r for r in rows if r.kind == "pyeccv" and (r.status.startswith("MISMATCH") or r.status.startswith("error"))]
    if bad:
        print("MISMATCH: " + ", ".join(f"{r.case}/{r.impl}: {r.status}" for r in bad), file=sys.stderr)
        return 1
    return 0
