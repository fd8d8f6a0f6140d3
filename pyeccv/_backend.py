"""The one place that knows what is available: the compiled core, its CUDA kernels, Triton, a GPU.

Triton is never imported here at module load: only `triton()` imports it, when a CUDA tensor
(or the interpreter in tests) needs a Triton kernel.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "native", "triton")


@functools.lru_cache(maxsize=None)
def C():
    """The compiled module pyeccv._C (raises ImportError with a hint when it is missing)."""
    try:
        return importlib.import_module("pyeccv._C")
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise ImportError(
            "pyeccv._C is missing: pyeccv must be installed (`pip install .`), not imported from "
            "the source tree"
        ) from e


def has_native() -> bool:
    try:
        C()
        return True
    except ImportError:
        return False


@functools.lru_cache(maxsize=None)
def has_cuda_kernels() -> bool:
    """True when _C was built with nvcc (CUDA kernels compiled in)."""
    return has_native() and bool(C().cuda_compiled())


def gpu_available() -> bool:
    return torch.cuda.is_available()


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton():
    """Imports triton lazily; raises a clear error when it is not installed."""
    if not has_triton():
        raise RuntimeError("this path needs Triton: pip install 'pyeccv[gpu]' (or triton)")
    return importlib.import_module("triton")


def kernels(core: str):
    """The Triton kernel module of a core (pyeccv.kernels.<core>), imported lazily."""
    triton()
    return importlib.import_module(f"pyeccv.kernels.{core}")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels can run on tensors of this device."""
    if not has_triton():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter()


def use_triton(device: torch.device, backend: str, what: str) -> bool:
    """Whether an op runs its Triton kernels: on CUDA tensors (auto), or when asked for (CUDA, or
    CPU tensors under TRITON_INTERPRET=1); `what` names the op in the error."""
    if backend == "triton":
        if not triton_usable(device):
            raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        return True
    if device.type == "cuda":
        if not has_triton():
            raise RuntimeError(f"{what} on CUDA needs Triton (pip install triton)")
        return True
    return False


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---- CPU instruction-set variants of the C++ kernels -------------------------------------------
CPU_ISAS = ("avx512", "avx2", "baseline")


def cpu_isa() -> str:
    """The instruction-set variant serving every vectorised CPU kernel: "avx512", "avx2" or
    "baseline" (chosen by PYECCV_CPU_ISA, `set_cpu_isa`, or the best this CPU supports)."""
    return C().cpu_isa()


def available_cpu_isas() -> list:
    """The variants compiled into this build that this CPU runs, best first."""
    return [s for s in C().cpu_isas_available().split(", ") if s]


def compiled_cpu_isas() -> list:
    """The variants compiled into this build, best first (one on non-x86 builds)."""
    return [s for s in C().cpu_isas_compiled().split(", ") if s]


def set_cpu_isa(name: str) -> None:
    """Select the variant for every CPU kernel of this process: "auto" | "avx512" | "avx2" |
    "baseline". ValueError when the name is unknown or this CPU / build lacks the variant."""
    if not isinstance(name, str):
        raise ValueError(f"cpu isa must be a string (auto, avx512, avx2, baseline), got {type(name).__name__}")
    C().set_cpu_isa(name)


class use_cpu_isa:
    """Context manager: run the block on one CPU variant, then restore the previous one."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.prev = cpu_isa()
        set_cpu_isa(self.name)
        return self

    def __exit__(self, *exc):
        set_cpu_isa(self.prev)
        return False


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (cpuid brand string on x86, /proc/cpuinfo elsewhere)."""
    return C().cpu_model()


def init_cpu_isa() -> None:
    """Resolve PYECCV_CPU_ISA at import, so a bad value fails there with a clear message."""
    env = os.environ.get("PYECCV_CPU_ISA", "")
    if not has_native():
        return
    try:
        C().set_cpu_isa(env or "auto")
    except ValueError as e:
        raise ValueError(f"{e} (from the environment variable PYECCV_CPU_ISA={env!r})") from None
