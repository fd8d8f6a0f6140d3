"""Benchmark machinery shared by every core: cases, timing, roofline, memory, table, JSON.

A core module (pyeccv/bench/<core>.py) defines CASES: a list of Case. Each Case builds, for a
device, a Spec: the implementations to time on the same inputs (the reference, pyeccv's
backends, installed peers), the bytes that must move and the useful flops (the roofline floor is
the larger of bytes / measured bandwidth and flops / measured fp32 matmul rate), and a check that all of
them agree before any number is reported.

The memory slope of the CPU roofline is a STREAM-like measurement over arrays far larger than
the last-level cache (see bandwidth_gbps), i.e. DRAM bandwidth. A case whose working set fits in
the cache can legitimately run faster than that floor; such rows are flagged (Row.beats_floor,
"BEATS FLOOR" in the tables) so that the reader knows the floor does not bound them, rather than
taking the flag for a measuring error.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

KINDS = ("reference", "pyeccv", "peer", "baseline")  # baseline: shown, not used in the ratios


@dataclasses.dataclass
class Impl:
    name: str  # e.g. "official", "scipy", "pyeccv", "torch-linear-assignment"
    kind: str  # "reference" | "pyeccv" | "peer" | "baseline"
    fn: Callable[[], Any]  # one call on the prepared inputs; returns its output
    note: str = ""


@dataclasses.dataclass
class Spec:
    impls: List[Impl]
    bytes: Optional[float] = None  # bytes that must move at least once (roofline floor)
    flops: Optional[float] = None  # useful arithmetic, when meaningful
    check: Optional[Callable[[Dict[str, Any]], Dict[str, str]]] = None  # outputs by name -> status by name
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Case:
    core: str
    name: str
    build: Callable[[str, bool], Optional[Spec]]  # (device, quick) -> Spec or None (not on this device)
    quick: bool = True  # part of --quick
    devices: tuple = ("cpu", "cuda")


@dataclasses.dataclass
class Row:
    core: str
    case: str
    device: str
    impl: str
    kind: str
    ms: Optional[float]
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    reps: int = 0
    vs_ref: Optional[float] = None  # reference time / this time (higher is faster)
    vs_peer: Optional[float] = None  # best peer time / this time
    gbps: Optional[float] = None
    floor_ms: Optional[float] = None
    peak_mb: Optional[float] = None
    status: str = ""
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    beats_floor: bool = False  # median below the roofline floor (see beats_floor())
    isa: Optional[str] = None  # pyeccv's CPU variant that ran (cpu rows)
    peer_isa: Optional[str] = None  # the instruction sets torch / oneDNN / MKL really used (cpu rows)
    cpu_model: Optional[str] = None
    cpu_isas: Optional[str] = None  # the variants this CPU and build run, best first
    instructions: Optional[int] = None  # callgrind Ir of one call (--count instructions)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Row":
        """A Row from write_json's output; unknown keys (a newer writer) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def beats_floor(r: Row) -> bool:
    """True when the row's median time is below its roofline floor. The floor uses DRAM bandwidth,
    so this is expected for working sets that fit in the last-level cache; for anything else it
    means the bytes or flops of the spec are overstated."""
    return r.ms is not None and r.floor_ms is not None and r.ms < r.floor_ms


# ---- machine -----------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa_info() -> Dict[str, Any]:
    """CPU model, the pyeccv variants this CPU / build runs and the one in use (the fields every
    row records). Falls back to /proc/cpuinfo when the compiled module is missing."""
    from .. import _backend

    if not _backend.has_native():
        return {"cpu": _cpu_name(), "cpu_isas": None, "cpu_isa": None}
    return {"cpu": _backend.cpu_model(), "cpu_isas": ",".join(_backend.available_cpu_isas()),
            "cpu_isa": _backend.cpu_isa()}


def machine_info() -> Dict[str, Any]:
    info = {
        **cpu_isa_info(),
        "llc_mib": round(llc_bytes() / 2**20),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


_BW: Dict[str, float] = {}
_BW_DETAIL: Dict[str, Dict[str, Any]] = {}  # per kernel GB/s and the array size, for the JSON

# A parent process (`--isa`) measures the machine once and hands the numbers to its children, so
# every variant is judged against the same floor (and the 3 GiB measurement is not repeated).
ENV_CPU_GBPS = "PYECCV_BENCH_CPU_GBPS"
ENV_CPU_GFLOPS = "PYECCV_BENCH_CPU_GFLOPS"


def llc_bytes() -> int:
    """Size of the largest (last-level) data or unified cache, from sysfs; 32 MiB when unknown."""
    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "size")) as f:
                txt = f.read().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:].upper(), 1)
        try:
            best = max(best, int(txt.rstrip("KkMmGg")) * mult)
        except ValueError:
            continue
    return best or 32 * 2**20


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stream_array_bytes() -> int:
    """Bytes per array of the CPU STREAM measurement: max(4 x LLC, 256 MiB) so the data must come
    from DRAM, but the three arrays together at most ~3 GiB and 1/4 of the available memory (on
    a machine with a huge LLC the arrays may then be only ~2 x LLC: still mostly DRAM traffic)."""
    per = max(4 * llc_bytes(), 256 * 2**20)
    cap = 3 * 2**30
    avail = _mem_available()
    if avail:
        cap = min(cap, avail // 4)
    return max(16 * 2**20, min(per, cap // 3))


def _stream_cpu(reps: int = 5) -> Dict[str, Any]:
    """STREAM-like copy / scale / triad over three arrays far beyond the LLC, on all of torch's
    intra-op threads (the same threads the kernels use: a single-threaded or in-cache copy
    understates what they reach). GB/s counts the bytes read plus the bytes written: 2 arrays for
    copy and scale, 3 for triad. No write-allocate correction is applied (a store that misses
    also reads its line, so the bus moves more than counted): the slope is what a kernel that
    counts its bytes the same way can reach, which is how Spec.bytes is counted."""
    n = stream_array_bytes() // 4
    a = torch.empty(n)
    b = torch.empty(n)
    c = torch.empty(n)
    # fill_ touches every page (first touch, on the threads that will use it); the values do not
    # matter to a streaming kernel, which has no data-dependent work
    a.fill_(0.5), b.fill_(1.0), c.fill_(2.0)
    s = 3.0
    kernels = {
        "copy": (lambda: a.copy_(b), 2),
        "scale": (lambda: torch.mul(b, s, out=a), 2),
        "triad": (lambda: torch.add(b, c, alpha=s, out=a), 3),
    }
    out: Dict[str, Any] = {"array_mib": round(n * 4 / 2**20), "llc_mib": round(llc_bytes() / 2**20),
                           "threads": torch.get_num_threads()}
    for name, (fn, arrays) in kernels.items():
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = arrays * n * 4 / best / 1e9
    del a, b, c
    return out


def bandwidth_gbps(device: str) -> float:
    """The roofline's memory slope in GB/s (read + write). CPU: the best of STREAM copy / scale /
    triad over DRAM-sized arrays on all threads (_stream_cpu). CUDA: a device copy of 256 MiB."""
    if device in _BW:
        return _BW[device]
    if device == "cpu":
        if os.environ.get(ENV_CPU_GBPS):
            _BW[device] = float(os.environ[ENV_CPU_GBPS])
            _BW_DETAIL[device] = {"from": ENV_CPU_GBPS}
        else:
            detail = _stream_cpu()
            _BW_DETAIL[device] = detail
            _BW[device] = max(detail[k] for k in ("copy", "scale", "triad"))
        return _BW[device]
    n = 256 * 2**20 // 4
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        t = _timer(device)
        with t:
            y.copy_(x)
        times.append(t.ms)
    _BW[device] = 2 * x.numel() * 4 / (min(times) * 1e-3) / 1e9
    return _BW[device]


_FLOPS: Dict[str, float] = {}


def compute_gflops(device: str) -> float:
    """Measured float32 matmul rate of this device (torch's BLAS / cuBLAS at the default matmul
    precision): the roofline's compute ceiling, for specs that give their useful flops."""
    if device in _FLOPS:
        return _FLOPS[device]
    if device == "cpu" and os.environ.get(ENV_CPU_GFLOPS):
        _FLOPS[device] = float(os.environ[ENV_CPU_GFLOPS])
        return _FLOPS[device]
    n = 8192 if device == "cuda" else 1536
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    times = []
    for _ in range(4):
        t = _timer(device)
        with t:
            torch.mm(a, b)
        times.append(t.ms)
    _FLOPS[device] = 2.0 * n ** 3 / (min(times[1:]) * 1e-3) / 1e9
    return _FLOPS[device]


# ---- timing ------------------------------------------------------------------------------------
class _timer:
    def __init__(self, device: str):
        self.device = device
        self.ms = 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.a = torch.cuda.Event(enable_timing=True)
            self.b = torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.b.record()
            torch.cuda.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_fn(fn: Callable[[], Any], device: str, *, budget_s: float, max_reps: int, min_reps: int = 3):
    """Median / p20 / p80 ms per call after one warm-up, within a time budget. Calls shorter than
    a millisecond are looped (timeit style) so each sample spans at least about 1 ms."""
    out = fn()  # warm-up (compiles, caches) and the output for the agreement check
    t = _timer(device)
    with t:
        fn()
    number = 1 if t.ms >= 1.0 else min(10000, int(1.0 / max(t.ms, 1e-4)) + 1)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t = _timer(device)
        with t:
            for _ in range(number):
                fn()
        times.append(t.ms / number)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return out, statistics.median(times), q(0.2), q(0.8), len(times)


def _rss_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Returns glibc's free heap chunks to the OS, so the next call cannot reuse resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pin_malloc_thresholds() -> None:
    """glibc raises its mmap threshold after large frees, so big buffers start coming from the
    heap and stay resident: a call's peak then no longer shows in RSS. Pinning the thresholds makes
    every large allocation mapped and unmapped, so RSS tracks the peak; it also slows allocation,
    so it is done only for the memory pass, after all timings."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Peak memory one call adds: CUDA allocator peak on GPU; RSS high-water mark on Linux CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _malloc_trim()
    base = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    peak = _rss_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


# ---- running -----------------------------------------------------------------------------------
def run_case(case: Case, device: str, quick: bool, progress: Callable[[str], None],
             max_reps: Optional[int] = None):
    """Times every implementation of a case; returns (rows, spec). Memory is measured later, in a
    separate pass (measure_memory), because the CPU measurement changes malloc's behaviour."""
    spec = case.build(device, quick)
    if spec is None:
        return [], None
    budget, reps = (0.4, 5) if quick else (2.0, 30)
    if max_reps is not None:
        reps = max_reps
    rows: List[Row] = []
    outputs: Dict[str, Any] = {}
    for impl in spec.impls:
        progress(f"{case.core}/{case.name} [{device}] {impl.name} ...")
        try:
            out, ms, p20, p80, n = time_fn(impl.fn, device, budget_s=budget, max_reps=reps, min_reps=min(3, reps))
            outputs[impl.name] = out
            rows.append(Row(case.core, case.name, device, impl.name, impl.kind, ms, p20, p80, n,
                            params=spec.params, note=impl.note))
        except Exception as e:  # a peer that fails is reported, not fatal
            rows.append(Row(case.core, case.name, device, impl.name, impl.kind, None, status=f"error: {e}"[:120],
                            params=spec.params, note=impl.note))
    statuses = spec.check(outputs) if spec.check is not None else {}
    ref = next((r.ms for r in rows if r.kind == "reference" and r.ms), None)
    peers = [r.ms for r in rows if r.kind == "peer" and r.ms]
    best_peer = min(peers) if peers else None
    bw = bandwidth_gbps(device) if spec.bytes else None
    fl = compute_gflops(device) if spec.flops else None
    for r in rows:
        if r.ms:
            r.vs_ref = ref / r.ms if ref else None
            r.vs_peer = best_peer / r.ms if best_peer else None
            if spec.bytes:
                r.gbps = spec.bytes / (r.ms * 1e-3) / 1e9
                r.floor_ms = spec.bytes / (bw * 1e9) * 1e3
            if spec.flops:  # roofline: the larger of the memory and the compute time
                r.floor_ms = max(r.floor_ms or 0.0, spec.flops / (fl * 1e9) * 1e3)
        if not r.status:  # "unchecked": nothing to compare with (e.g. the reference cannot run)
            r.status = statuses.get(r.impl, ("ok" if spec.check is None else "unchecked") if r.ms else "")
        r.beats_floor = beats_floor(r)
    stamp_rows(rows, device)
    return rows, spec


def stamp_rows(rows: List[Row], device: str) -> None:
    """Records the CPU, its variants and (cpu rows) the variant that ran and the peers' ISA."""
    info = cpu_isa_info()
    peer = None
    if device == "cpu":
        from ._isa import effective_peer_isa

        peer = effective_peer_isa()["summary"]
    for r in rows:
        r.cpu_model, r.cpu_isas = info["cpu"], info["cpu_isas"]
        if device == "cpu":
            r.isa, r.peer_isa = info["cpu_isa"], peer


def measure_memory(rows: List[Row], spec: Spec, device: str) -> None:
    """Peak memory of one call of each implementation that ran (fills Row.peak_mb)."""
    if device == "cpu":
        pin_malloc_thresholds()
    by_name = {impl.name: impl for impl in spec.impls}
    for r in rows:
        if r.ms is not None and r.impl in by_name:
            try:
                r.peak_mb = peak_memory_mb(by_name[r.impl].fn, device)
            except Exception:  # reported as "-"
                r.peak_mb = None


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _check_cell(r: Row) -> str:
    return (r.status + ", BEATS FLOOR" if r.status else "BEATS FLOOR") if r.beats_floor else r.status


def table(rows: List[Row]) -> str:
    head = ["case", "dev", "impl", "ms", "vs ref", "vs peer", "GB/s", "floor ms", "peak MB", "check"]
    body = []
    for r in rows:
        body.append([r.case, r.device, r.impl, _fmt(r.ms, ".3f"), _fmt(r.vs_ref, ".2f") + ("x" if r.vs_ref else ""),
                     _fmt(r.vs_peer, ".2f") + ("x" if r.vs_peer else ""), _fmt(r.gbps, ".1f"),
                     _fmt(r.floor_ms, ".3f"), _fmt(r.peak_mb, ".1f"), _check_cell(r)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 or i == 9 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def markdown(rows: List[Row]) -> str:
    out = ["| case | dev | isa | impl | ms | p20-p80 | vs ref | vs best peer | GB/s | floor ms | peak MB | check |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = "-" if r.ms_p20 is None else f"{r.ms_p20:.3g}-{r.ms_p80:.3g}"
        out.append(f"| {r.case} | {r.device} | {r.isa or '-'} | {r.impl} | {_fmt(r.ms, '.3f')} | {spread} | "
                   f"{_fmt(r.vs_ref, '.2f')} | {_fmt(r.vs_peer, '.2f')} | {_fmt(r.gbps, '.1f')} | "
                   f"{_fmt(r.floor_ms, '.3f')} | {_fmt(r.peak_mb, '.1f')} | {_check_cell(r)} |")
    return "\n".join(out)


def beats_floor_line(rows: List[Row]) -> Optional[str]:
    """The closing line that lists the rows faster than their floor (None when there are none)."""
    fast = [r for r in rows if r.beats_floor]
    if not fast:
        return None
    items = ", ".join(f"{r.case}/{r.impl}{'@' + r.isa if r.isa else ''} ({r.ms:.3g} < {r.floor_ms:.3g} ms)"
                      for r in fast)
    return (f"BEATS FLOOR (faster than bytes / DRAM bandwidth: expected when the working set fits in the "
            f"{round(llc_bytes() / 2**20)} MiB last-level cache, otherwise the spec overstates its bytes): {items}")


def write_json(path: str, rows: List[Row], argv: List[str], extra: Optional[Dict[str, Any]] = None) -> None:
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m pyeccv " + " ".join(argv),
        "machine": machine_info(),
        "bandwidth_gbps": dict(_BW),
        "bandwidth_detail": dict(_BW_DETAIL),
        "matmul_gflops": dict(_FLOPS),
        **(extra or {}),
        "results": [dataclasses.asdict(r) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def stderr_progress(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
