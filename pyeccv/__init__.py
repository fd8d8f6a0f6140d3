"""pyeccv: fast, exact, drop-in PyTorch ops for the hot cores of six ECCV 2020 papers.

Cores: hungarian (DETR), smooth_ap (Smooth-AP), grad_central (Gradient Centralization),
volume_render (NeRF), cond_mask_head (CondInst), dyn_group_conv (DGC). See README.md.
"""
from . import _backend

_backend.init_cpu_isa()  # a bad PYECCV_CPU_ISA fails here, naming the variable and the choices

from . import interop, ops  # noqa: F401  (importing ops registers the torch.library ops)
from .ops.cond_mask_head import cond_mask_head, num_gen_params
from .ops.dyn_group_conv import dyn_group_conv2d
from .ops.hungarian import batch_linear_sum_assignment, detr_match_cost, linear_sum_assignment
from .ops.smooth_ap import smooth_ap_loss
from .ops.volume_render import render_weights, render_weights_from_alpha, volume_render, volume_render_alpha
from ._backend import available_cpu_isas, cpu_isa, set_cpu_isa, use_cpu_isa

__version__ = "0.1.0"


def cmake_prefix_path() -> str:
    """Prefix for CMake's find_package(pyeccv): the torch-free C++ core (headers + static lib)."""
    import os

    return os.path.dirname(os.path.abspath(__file__))


__all__ = [
    "batch_linear_sum_assignment",
    "cond_mask_head",
    "dyn_group_conv2d",
    "num_gen_params",
    "detr_match_cost",
    "linear_sum_assignment",
    "smooth_ap_loss",
    "render_weights",
    "render_weights_from_alpha",
    "volume_render",
    "volume_render_alpha",
    "cmake_prefix_path",
    "cpu_isa",
    "set_cpu_isa",
    "use_cpu_isa",
    "available_cpu_isas",
    "__version__",
]


def __getattr__(name):  # lazy subpackages: pyeccv.nn, pyeccv.reference, pyeccv.bench
    import importlib

    if name in ("nn", "reference", "bench", "testing", "optim", "models"):
        return importlib.import_module(f"pyeccv.{name}")
    raise AttributeError(f"module 'pyeccv' has no attribute {name!r}")
