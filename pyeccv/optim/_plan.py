"""Cached launch plans for the GC optimizers: the pointer table of a (param group, device, dtype)
bucket is built once and only its gradient column is refreshed per step, so a step costs one
kernel call plus a few microseconds a tensor of Python (no host synchronisation)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops.grad_central import _FIELDS, _dense_rows, _run


class Plan:
    """One bucket: params (local tensors), state columns, GC flags; the table for the kernels."""

    def __init__(self, params: Sequence[Tensor], bufs: Sequence[Sequence[Tensor]], gc: Sequence[bool],
                 init: Optional[Sequence[bool]] = None, steps: Optional[List[dict]] = None):
        self.params = list(params)
        n = len(self.params)
        self.n = n
        self.bufs = [list(b) for b in bufs]
        tab = np.zeros((n, _FIELDS), dtype=np.int64)
        ok = True
        for i, p in enumerate(self.params):
            rows = p.shape[0] if p.dim() > 0 else 1
            tab[i, 0] = p.data_ptr()
            for k, col in enumerate(self.bufs[:3]):
                if col:
                    tab[i, 2 + k] = col[i].data_ptr()
                    ok &= col[i].stride() == p.stride()
            tab[i, 5] = rows if p.numel() else 0
            tab[i, 6] = p.numel() // rows if p.numel() else 0
            tab[i, 7] = int(bool(gc[i]))
            tab[i, 8] = int(bool(init[i])) if init is not None else 0
            ok &= _dense_rows(p)
        self.tab = tab
        self.param_ptrs = [int(x) for x in tab[:, 0]]
        self.scal = np.zeros((n, 2), dtype=np.float64)
        self.usable = ok  # else the generic op path (dense copies) is taken
        self.strides = [p.stride() for p in self.params]
        # Adam's per-parameter step counts (state["step"], as torch keeps them). When they agree,
        # they become 0-dim views of one buffer: one add_ a step instead of one op per tensor.
        self.t: Optional[float] = None
        self.step_buf: Optional[Tensor] = None
        self.step_states = steps
        if steps:
            vals = [float(st["step"]) for st in steps]
            if all(v == vals[0] for v in vals) and all(st["step"].device.type == "cpu" for st in steps):
                self.t = vals[0]
                self.step_buf = torch.full((len(steps),), vals[0], dtype=steps[0]["step"].dtype)
                for i, st in enumerate(steps):
                    st["step"] = self.step_buf[i]
        self.items_dev = None  # Triton: work items, uploaded once

    def increment_steps(self) -> None:
        if self.step_buf is not None:
            self.step_buf.add_(1.0)
        else:
            for st in self.step_states:
                st["step"] += 1

    def refresh(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
        """New gradient pointers; False when a parameter moved or a gradient's layout differs."""
        if not self.usable:
            return False
        ptrs = [p.data_ptr() for p in params]
        if ptrs != self.param_ptrs:
            return False
        strides = self.strides
        for i, g in enumerate(grads):
            if g.stride() != strides[i] or g.dtype != params[i].dtype:
                return False
        self.tab[:, 1] = [g.data_ptr() for g in grads]
        return True

    def adam_scalars(self, lr: float, beta1: float, beta2: float) -> None:
        """Per-tensor step sizes from the (already incremented) step counts, as torch computes them."""
        if self.t is not None:
            self.t += 1.0
            t = self.t
            self.scal[:, 0] = lr / (1 - beta1 ** t)
            self.scal[:, 1] = (1 - beta2 ** t) ** 0.5
        else:
            ts = [float(st["step"]) for st in self.step_states]
            self.scal[:, 0] = [lr / (1 - beta1 ** t) for t in ts]
            self.scal[:, 1] = [(1 - beta2 ** t) ** 0.5 for t in ts]

    def run(self, kind: str, backend: str, **hyper) -> None:
        _run(kind, backend, self, **hyper)
        if kind == "sgd":
            self.tab[:, 8] = 0  # momentum buffers exist from now on
