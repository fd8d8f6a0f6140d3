"""Argument checks shared by the ops: each message names the argument and what was expected."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
           shape: Optional[Sequence[Optional[int]]] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the other inputs), got {x.device}")
    return x


def is_int(x: torch.Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def finite(name: str, x: torch.Tensor) -> None:
    """NaN/inf check; costs one reduction (and a sync on GPU), so only where the op needs it."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
