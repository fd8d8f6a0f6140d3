"""DLPack in, same kind out: NumPy, CuPy, JAX or anything with __dlpack__ talks to pyeccv.

`to_torch(x)` returns (tensor, back) where `back(t)` turns a result tensor into x's kind.
Zero-copy wherever DLPack allows it (NumPy arrays share memory with CPU tensors).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Tuple

import numpy as np
import torch


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _numpy_back(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_torch(x: Any) -> Tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    if isinstance(x, torch.Tensor):
        return x, _identity
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.dtype == object:
            raise ValueError("cost must be a numeric array, got dtype object")
        if any(s < 0 for s in a.strides) or not a.flags.aligned:
            a = np.ascontiguousarray(a)
        if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write
            a = a.copy()
        return torch.from_numpy(a), _numpy_back
    if hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
        return t, _back_for(x)
    raise TypeError(f"expected a torch tensor, a NumPy array or an object with __dlpack__, got {type(x).__name__}")


def _back_for(x: Any) -> Callable[[torch.Tensor], Any]:
    """from_dlpack of x's own library (cupy.from_dlpack, jax.numpy.from_dlpack, ...)."""
    root = type(x).__module__.split(".")[0]
    mod = sys.modules.get(root)
    if root in ("jax", "jaxlib"):
        mod = importlib.import_module("jax.numpy")
    fn = getattr(mod, "from_dlpack", None)
    if fn is None:
        return _identity
    return lambda t: fn(t.detach().contiguous())


def from_torch(t: torch.Tensor, like: Any) -> Any:
    """Converts a result tensor to the kind of `like`."""
    return to_torch(like)[1](t)
