"""Test helpers shared by every core: tolerances (with reasons), random inputs, poisoning,
opcheck and torch.compile checks. Used by tests/ and by the benchmark's correctness gate."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

# ---- tolerances: relative error ||out - ref|| / ||ref|| against a float64 reference -------------
# Keyed by (kind, dtype). Each value carries its reason; change one only with a new reason.
TOLERANCES: Dict[Tuple[str, torch.dtype], Tuple[float, str]] = {
    ("elementwise", torch.float64): (1e-12, "same formula in float64; only op order differs"),
    ("elementwise", torch.float32): (1e-5, "float32 rounding of a few chained ops (about 1e-7 each)"),
    ("reduction", torch.float64): (1e-10, "float64 sums in a different order"),
    ("reduction", torch.float32): (1e-4, "float32 accumulation over up to ~1e4 terms in another order"),
    ("elementwise", torch.bfloat16): (1e-2, "bf16 inputs/outputs carry 8 bits of mantissa (~4e-3)"),
    ("elementwise", torch.float16): (1e-2, "fp16 inputs/outputs carry 11 bits of mantissa (~5e-4), margin for exp/log"),
    ("reduction", torch.bfloat16): (1e-2, "bf16 inputs, fp32 accumulation"),
    ("reduction", torch.float16): (1e-2, "fp16 inputs, fp32 accumulation"),
    # Gradients through ReLU gates from half inputs: a pre-activation within rounding of 0 may
    # switch its gate between two exact computations (fp32 vs the float64 reference), which moves
    # a small tensor's gradient norm by ~1e-2 (seen: 1.35e-2 on a 2 x 8 x 4 x 5 map).
    ("gated-grad", torch.bfloat16): (4e-2, "bf16: gate flips at |pre-activation| ~ 4e-3"),
    ("gated-grad", torch.float16): (4e-2, "fp16: gate flips at |pre-activation| ~ 5e-4"),
    # Assignment is exact: float64 duals and sums over exactly representable inputs.
    ("assignment", torch.float64): (1e-12, "exact optimum; only the order of the final sum differs"),
    ("assignment", torch.float32): (1e-12, "float32 costs are exact in float64; same optimum"),
}


def tolerance(kind: str, dtype: torch.dtype) -> float:
    return TOLERANCES[(kind, dtype)][0]


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-5) -> float:
    """||out - ref|| / max(||ref||, floor): relative, except for references that are zero up to
    rounding noise (e.g. a gradient that vanishes exactly in theory), where it is absolute."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return (out64 - ref64).norm().item() / max(ref64.norm().item(), floor)


def assert_close(out: torch.Tensor, ref: torch.Tensor, kind: str, dtype: Optional[torch.dtype] = None,
                 name: str = "output", floor: float = 1e-5) -> None:
    """Relative-error check with a readable report of the worst elements on failure; `floor` is the
    smallest reference norm the error is taken relative to (raise it where entries sum terms that
    can cancel far below their own size)."""
    dtype = dtype or out.dtype
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o, r = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    same_nonfinite = (torch.isinf(o) == torch.isinf(r)) & (torch.isnan(o) == torch.isnan(r))
    if not bool(same_nonfinite.all()):
        bad = torch.nonzero(~same_nonfinite)[:5].tolist()
        raise AssertionError(f"{name}: non-finite entries differ at {bad}")
    fin = torch.isfinite(r)
    tol = tolerance(kind, dtype)
    err = rel_err(o[fin], r[fin], floor) if bool(fin.any()) else 0.0
    if not err <= tol:
        diff = (o - r).abs().where(fin, torch.zeros_like(o)).flatten()
        top = torch.topk(diff, min(5, diff.numel()))
        rows = [f"  [{tuple(int(v) for v in torch.unravel_index(torch.tensor(i), o.shape))}] "
                f"out={o.flatten()[i]:.6g} ref={r.flatten()[i]:.6g}" for i in top.indices.tolist()]
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:.1g} ({kind}, {dtype})\n" + "\n".join(rows))


# ---- inputs ---------------------------------------------------------------------------------
# Awkward sizes: 1, primes, just past powers of two and block sizes.
AWKWARD = (1, 2, 3, 5, 7, 13, 31, 33, 97, 127, 129, 257)


def generator(seed: Optional[int] = None) -> torch.Generator:
    """A fresh generator seeded from the OS, unless PYECCV_TEST_SEED pins it; g.initial_seed() tells."""
    g = torch.Generator()
    if seed is None:
        env = os.environ.get("PYECCV_TEST_SEED")
        seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    g.manual_seed(seed)
    return g


def rand(*shape: int, dtype=torch.float32, device="cpu", g: Optional[torch.Generator] = None,
         low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    x = torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low
    return x.to(dtype=dtype, device=device)


def randn(*shape: int, dtype=torch.float32, device="cpu", g: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Every torch.empty inside is filled with NaN (floats) / the max value (ints), so an output
    element a kernel forgets to write shows up instead of passing by luck."""
    import torch.utils.deterministic as det

    prev, prev_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)
        det.fill_uninitialized_memory = prev_fill


# ---- op-level checks --------------------------------------------------------------------------
def opcheck(op, args: Sequence[Any], kwargs: Optional[dict] = None, *, skip_autograd: bool = False) -> None:
    """torch.library.opcheck over schema, fake tensor, autograd registration and AOT dispatch."""
    utils = ["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"]
    if not skip_autograd:
        utils.append("test_autograd_registration")
    torch.library.opcheck(op, tuple(args), kwargs or {}, test_utils=utils)


def compile_check(fn: Callable, *args: Any, compare: Optional[Callable[[Any, Any], None]] = None, **kwargs: Any):
    """Runs fn under torch.compile(fullgraph=True) (no graph breaks allowed) and compares with eager."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(*args, **kwargs)
    want = fn(*args, **kwargs)
    if compare is not None:
        compare(got, want)
    else:
        torch.testing.assert_close(got, want)
    return got


def backends() -> list:
    """The backends an op test runs here: native, and triton when it can run (GPU or interpreter)."""
    return ["native"] + (["triton"] if triton_device() is not None else [])


def device_of(backend: str) -> str:
    """The device of a backend's test tensors (the interpreter runs Triton on CPU tensors)."""
    return (triton_device() or "cpu") if backend == "triton" else "cpu"


def triton_device() -> Optional[str]:
    """Where Triton kernels can run in this process: "cuda", "cpu" (interpreter) or None."""
    from . import _backend

    if not _backend.has_triton():
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if _backend.triton_interpreter() else None


# ---- torch.distributed on CPU (gloo) ----------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_entry(rank, world, port, fn, args, queue):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    except BaseException as e:  # report instead of hanging the parent
        queue.put((rank, e))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 180.0) -> list:
    """Runs fn(rank, world, *args) in `world` spawned processes under a gloo process group and
    returns their results by rank. fn must be a module-level function; return plain Python /
    NumPy values (tensors would travel through shared memory that dies with the child)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, value = queue.get(timeout=timeout)
            if isinstance(value, BaseException):
                raise RuntimeError(f"rank {rank} failed: {value!r}") from value
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return [results[r] for r in range(world)]
