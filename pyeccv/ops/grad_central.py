"""Gradient Centralization fused into multi-tensor SGD / Adam / AdamW steps, as torch custom ops.

Ops (in place; schemas are stable; see tests/optim/test_grad_central.py):
  pyeccv::gc_sgd_(params!, grads, momentum_buffers!, gc, init, lr, momentum, dampening,
                  weight_decay, nesterov, maximize, backend)
  pyeccv::gc_adam_(params!, grads, exp_avgs!, exp_avg_sqs!, max_exp_avg_sqs!, gc, step_sizes,
                   bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                   gc_update, backend)
All tensors of one call share a device and a parameter dtype; state buffers are float32 for
bfloat16 / float16 parameters. gc[i] says whether tensor i is centralised (its rows are the
slices along dim 0). Semantics: csrc/include/pyeccv/grad_central.h. The pyeccv.optim classes
call these once per (param group, device, dtype).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _backend

_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_FIELDS = 11  # param, grad, buf0, buf1, buf2, rows, row_len, gc, init_buf, step_size, bc2_sqrt


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state dtype for a parameter: float32 for low-precision parameters."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _dense_rows(t: Tensor) -> bool:
    """Every dim-0 slice is one contiguous block of memory (contiguous or channels_last)."""
    if t.numel() == 0 or t.dim() == 0:
        return True
    if not t.is_contiguous() and not (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return False
    return t.stride(0) * t.shape[0] == t.numel() or t.shape[0] == 1


def _like(src: Tensor, ref: Tensor) -> Tensor:
    """src with ref's dtype, device and memory layout (a copy only when they differ)."""
    if src.dtype == ref.dtype and src.stride() == ref.stride() and src.device == ref.device:
        return src
    out = torch.empty_like(ref)
    out.copy_(src)
    return out


def _check_lists(name: str, tensors: Sequence[Tensor], params: Sequence[Tensor], state: bool) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"{name} must hold one tensor per parameter ({len(params)}), got {len(tensors)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(f"{name}[{i}] must match params[{i}] in shape and device, got {tuple(t.shape)} on "
                             f"{t.device} for {tuple(p.shape)} on {p.device}")
        want = state_dtype(p) if state else p.dtype
        if t.dtype != want:
            raise ValueError(f"{name}[{i}] must be {want}, got {t.dtype}")


def _check(params, grads, gc, bufs: Sequence[Sequence[Tensor]], names: Sequence[str]) -> None:
    if not params:
        return
    dev, dt = params[0].device, params[0].dtype
    if dt not in _CODE:
        raise ValueError(f"params must be float32 / float64 / bfloat16 / float16, got {dt}")
    for i, p in enumerate(params):
        if p.device != dev or p.dtype != dt:
            raise ValueError(f"params must share one device and dtype: params[{i}] is {p.dtype} on {p.device}, "
                             f"params[0] is {dt} on {dev}")
    _check_lists("grads", grads, params, state=False)
    for name, b in zip(names, bufs):
        _check_lists(name, b, params, state=True)
    if len(gc) != len(params):
        raise ValueError(f"gc must hold one flag per parameter ({len(params)}), got {len(gc)}")


class _Prepared:
    """Dense working copies where needed (written back after the kernel) and the pointer table."""

    def __init__(self, params, grads, bufs: List[List[Tensor]], gc, init=None, step_sizes=None, bc2=None):
        self.writeback = []
        n = len(params)
        work_p = []
        for p in params:
            if _dense_rows(p):
                work_p.append(p)
            else:  # a strided parameter: update a dense copy, copy it back
                c = p.contiguous()
                self.writeback.append((p, c))
                work_p.append(c)
        work_bufs = []
        for b in bufs:
            col = []
            for t, wp in zip(b, work_p):
                if t.stride() == wp.stride():
                    col.append(t)
                else:
                    c = _like(t, torch.empty_like(wp, dtype=t.dtype))
                    self.writeback.append((t, c))
                    col.append(c)
            work_bufs.append(col)
        self.grads = [_like(g, torch.empty_like(wp, dtype=wp.dtype)) if g.stride() != wp.stride() else g
                      for g, wp in zip(grads, work_p)]
        self.params, self.bufs = work_p, work_bufs
        tab = np.zeros((n, _FIELDS), dtype=np.int64)
        scal = np.zeros((n, 2), dtype=np.float64)
        for i, p in enumerate(work_p):
            rows = p.shape[0] if p.dim() > 0 else 1
            tab[i, 0] = p.data_ptr()
            tab[i, 1] = self.grads[i].data_ptr()
            for k, col in enumerate(work_bufs[:3]):
                tab[i, 2 + k] = col[i].data_ptr() if col else 0
            tab[i, 5] = rows if p.numel() else 0
            tab[i, 6] = p.numel() // rows if p.numel() else 0
            tab[i, 7] = int(bool(gc[i]))
            tab[i, 8] = int(bool(init[i])) if init is not None else 0
            if step_sizes is not None:
                scal[i] = (step_sizes[i], bc2[i])
        self.tab, self.scal = tab, scal

    def finish(self) -> None:
        for dst, src in self.writeback:
            dst.copy_(src)


def _reference_sgd(params, grads, bufs, gc, init, lr, momentum, dampening, wd, nesterov, maximize):
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() == 0:
            continue
        dt = state_dtype(p)
        d = (-g if maximize else g).to(dt) + wd * p.to(dt)
        if gc[i]:
            d = d - d.reshape(d.shape[0], -1).mean(1).reshape((-1,) + (1,) * (d.dim() - 1))
        if momentum != 0 and bufs:
            b = d.clone() if init[i] else bufs[i] * momentum + (1 - dampening) * d
            bufs[i].copy_(b)
            d = d + momentum * b if nesterov else b
        p.copy_((p.to(dt) - lr * d).to(p.dtype))


def _reference_adam(params, grads, m, v, vmax, gc, step_sizes, bc2, lr, beta1, beta2, eps, weight_decay, amsgrad,
                    maximize, decoupled, gc_update):
    wd = weight_decay
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() == 0:
            continue
        dt = state_dtype(p)
        pf = p.to(dt)
        d = (-g if maximize else g).to(dt)
        if not decoupled:
            d = d + wd * pf
        rm = (lambda x: x.reshape(x.shape[0], -1).mean(1).reshape((-1,) + (1,) * (x.dim() - 1)))
        if gc[i] and not gc_update:
            d = d - rm(d)
        m[i].lerp_(d, 1 - beta1)
        v[i].mul_(beta2).addcmul_(d, d, value=1 - beta2)
        vv = v[i]
        if amsgrad:
            torch.maximum(vmax[i], v[i], out=vmax[i])
            vv = vmax[i]
        u = m[i] / (vv.sqrt() / bc2[i] + eps)
        if gc[i] and gc_update:
            u = u - rm(u)
        if decoupled:
            pf = pf * (1 - lr * wd)
        p.copy_((pf - step_sizes[i] * u).to(p.dtype))


def _run(kind: str, backend: str, prep: _Prepared, **hyper) -> None:
    device = prep.params[0].device
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        if not _backend.triton_usable(device):
            raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        _backend.kernels("grad_central").step(kind, prep, hyper)
        return
    if device.type != "cpu":
        raise ValueError(f"no native {device.type} kernel for the GC optimizers (use backend='triton')")
    C = _backend.C()
    tab = np.ascontiguousarray(prep.tab)
    scal = np.ascontiguousarray(prep.scal)
    code = _CODE[prep.params[0].dtype]
    if kind == "sgd":
        C.gc_sgd_cpu(tab.ctypes.data, scal.ctypes.data, len(prep.params), code, hyper["lr"], hyper["momentum"],
                     hyper["dampening"], hyper["weight_decay"], hyper["nesterov"], hyper["maximize"],
                     torch.get_num_threads())
    else:
        C.gc_adam_cpu(tab.ctypes.data, scal.ctypes.data, len(prep.params), code, hyper["lr"], hyper["beta1"],
                      hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["amsgrad"], hyper["maximize"],
                      hyper["decoupled"], hyper["gc_update"], torch.get_num_threads())


@torch.library.custom_op("pyeccv::gc_sgd_", mutates_args=("params", "momentum_buffers"))
def gc_sgd_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], gc: List[bool],
            init: List[bool], lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
            maximize: bool, backend: str) -> None:
    bufs = [momentum_buffers] if momentum_buffers else []
    _check(params, grads, gc, bufs, ["momentum_buffers"])
    if len(init) != len(params):
        raise ValueError(f"init must hold one flag per parameter ({len(params)}), got {len(init)}")
    if not params:
        return
    grads = [g.detach() for g in grads]
    if backend == "reference":
        _reference_sgd(params, grads, momentum_buffers, gc, init, lr, momentum, dampening, weight_decay, nesterov,
                       maximize)
        return
    prep = _Prepared(params, grads, [momentum_buffers] if momentum_buffers else [[]], gc, init=init)
    _run("sgd", backend, prep, lr=lr, momentum=momentum if momentum_buffers else 0.0, dampening=dampening,
         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    prep.finish()


@gc_sgd_.register_fake
def _(params, grads, momentum_buffers, gc, init, lr, momentum, dampening, weight_decay, nesterov, maximize, backend):
    return None


@torch.library.custom_op("pyeccv::gc_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def gc_adam_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
             max_exp_avg_sqs: List[Tensor], gc: List[bool], step_sizes: List[float], bc2_sqrts: List[float],
             lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
             decoupled: bool, gc_update: bool, backend: str) -> None:
    bufs = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    _check(params, grads, gc, bufs, ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
    if len(step_sizes) != len(params) or len(bc2_sqrts) != len(params):
        raise ValueError("step_sizes and bc2_sqrts must hold one value per parameter")
    if not params:
        return
    grads = [g.detach() for g in grads]
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, decoupled=decoupled, gc_update=gc_update)
    if backend == "reference":
        _reference_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, gc, step_sizes, bc2_sqrts, **hyper)
        return
    prep = _Prepared(params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []], gc,
                     step_sizes=step_sizes, bc2=bc2_sqrts)
    _run("adam", backend, prep, **hyper)
    prep.finish()


@gc_adam_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, gc, step_sizes, bc2_sqrts, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, decoupled, gc_update, backend):
    return None


def centralise(x: Tensor, mode: Optional[str]) -> bool:
    """Whether GC applies to a tensor under gc_mode ("all": ndim > 1, "conv": ndim > 3, None)."""
    if mode is None:
        return False
    return x.dim() > (3 if mode == "conv" else 1)
