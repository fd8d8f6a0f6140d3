"""Triton kernels of the Gradient Centralization core: multi-tensor SGD / Adam / AdamW steps.

One launch updates every tensor of a (param group, device, dtype). A table holds each tensor's
pointers (param, grad, state buffers) and row length; a work list cuts the tensors into items of
whole rows (centralised tensors) or plain element ranges. A program takes one item: for a
centralised row it reads the row once for its mean (the re-read for the update comes from L2),
then applies the step. Semantics: csrc/include/pyeccv/grad_central.h.
"""
import numpy as np
import torch
import triton
import triton.language as tl

_BLOCK = 1024
_ITEM = 8192  # elements per work item (whole rows for centralised tensors)


@triton.jit
def _ptr(tab, t, k, DT: tl.constexpr):
    return tl.load(tab + t * 11 + k).to(tl.pointer_type(DT))


@triton.jit
def _item(items, tab):
    """This program's work item: tensor t, element range [b, e), row length, GC flag, segment."""
    w = tl.program_id(0)
    t = tl.load(items + 3 * w)
    b = tl.load(items + 3 * w + 1)
    e = tl.load(items + 3 * w + 2)
    row_len = tl.load(tab + t * 11 + 6)
    gc = tl.load(tab + t * 11 + 7)
    seg = tl.where(gc != 0, row_len, e - b)  # a row when centralising, else the whole range
    return t, b, e, gc, seg


@triton.jit
def _grad_mean(g, p, r0, seg, sign, l2, SDT: tl.constexpr, BLOCK: tl.constexpr):
    """Mean over one row of the gradient after L2 decay: sign * g + l2 * p."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), SDT)
    for c in range(r0, r0 + seg, BLOCK):
        i = c + offs
        m = i < r0 + seg
        d = sign * tl.load(g + i, mask=m, other=0.0).to(SDT) + l2 * tl.load(p + i, mask=m, other=0.0).to(SDT)
        acc += tl.where(m, d, 0.0)
    return tl.sum(acc, 0) / seg.to(SDT)


@triton.jit
def _moments(mp, vp, xp, i, m, d, b1, b2, SDT: tl.constexpr, AMSGRAD: tl.constexpr):
    """Adam moments of the elements i from the gradient d (stored); returns (m, v or max v)."""
    mi = tl.load(mp + i, mask=m, other=0.0).to(SDT)
    vi = tl.load(vp + i, mask=m, other=0.0).to(SDT)
    mi = mi + b1 * (d - mi)
    vi = b2 * vi + (1.0 - b2) * d * d
    tl.store(mp + i, mi.to(SDT), mask=m)
    tl.store(vp + i, vi.to(SDT), mask=m)
    if AMSGRAD:
        vi = tl.maximum(tl.load(xp + i, mask=m, other=0.0).to(SDT), vi)
        tl.store(xp + i, vi.to(SDT), mask=m)
    return mi, vi


@triton.jit
def _sgd_kernel(items, tab, lr, momentum, damp, wd, sign,
                PDT: tl.constexpr, SDT: tl.constexpr, HAS_BUF: tl.constexpr, NESTEROV: tl.constexpr,
                BLOCK: tl.constexpr):
    t, b, e, gc, seg = _item(items, tab)
    p = _ptr(tab, t, 0, PDT)
    g = _ptr(tab, t, 1, PDT)
    buf = _ptr(tab, t, 2, SDT)
    init = tl.load(tab + t * 11 + 8)
    offs = tl.arange(0, BLOCK)
    for r0 in range(b, e, seg):
        mean = 0.0
        if gc != 0:
            mean = _grad_mean(g, p, r0, seg, sign, wd, SDT, BLOCK)
        for c in range(r0, r0 + seg, BLOCK):
            i = c + offs
            m = i < r0 + seg
            pi = tl.load(p + i, mask=m, other=0.0).to(SDT)
            d = sign * tl.load(g + i, mask=m, other=0.0).to(SDT) + wd * pi - mean
            if HAS_BUF:
                old = tl.load(buf + i, mask=m, other=0.0).to(SDT)  # garbage on the first step: not selected
                bi = tl.where(init != 0, d, momentum * old + damp * d)
                tl.store(buf + i, bi.to(SDT), mask=m)
                if NESTEROV:
                    d = d + momentum * bi
                else:
                    d = bi
            tl.store(p + i, (pi - lr * d).to(PDT), mask=m)


@triton.jit
def _adam_kernel(items, tab, scal, b1, b2, eps, l2, decay, sign,
                 PDT: tl.constexpr, SDT: tl.constexpr, AMSGRAD: tl.constexpr, GC_UPDATE: tl.constexpr,
                 BLOCK: tl.constexpr):
    t, b, e, gc, seg = _item(items, tab)
    p = _ptr(tab, t, 0, PDT)
    g = _ptr(tab, t, 1, PDT)
    mp = _ptr(tab, t, 2, SDT)
    vp = _ptr(tab, t, 3, SDT)
    xp = _ptr(tab, t, 4, SDT)
    step = tl.load(scal + 2 * t).to(SDT)
    bc2 = tl.load(scal + 2 * t + 1).to(SDT)
    offs = tl.arange(0, BLOCK)
    for r0 in range(b, e, seg):
        gmean = 0.0
        umean = 0.0
        if gc != 0:
            acc = tl.zeros((BLOCK,), SDT)
            for c in range(r0, r0 + seg, BLOCK):
                i = c + offs
                m = i < r0 + seg
                d = sign * tl.load(g + i, mask=m, other=0.0).to(SDT) \
                    + l2 * tl.load(p + i, mask=m, other=0.0).to(SDT)
                if GC_UPDATE:  # moments now, mean of the update direction
                    mi, vi = _moments(mp, vp, xp, i, m, d, b1, b2, SDT, AMSGRAD)
                    d = mi / (tl.sqrt(vi) / bc2 + eps)
                acc += tl.where(m, d, 0.0)
            if GC_UPDATE:
                umean = tl.sum(acc, 0) / seg.to(SDT)
            else:
                gmean = tl.sum(acc, 0) / seg.to(SDT)
        for c in range(r0, r0 + seg, BLOCK):
            i = c + offs
            m = i < r0 + seg
            pi = tl.load(p + i, mask=m, other=0.0).to(SDT)
            upd = gc * 0
            if GC_UPDATE:
                upd = gc
            if upd != 0:  # moments were updated by the mean pass
                mi = tl.load(mp + i, mask=m, other=0.0).to(SDT)
                if AMSGRAD:
                    vi = tl.load(xp + i, mask=m, other=0.0).to(SDT)
                else:
                    vi = tl.load(vp + i, mask=m, other=1.0).to(SDT)
            else:
                d = sign * tl.load(g + i, mask=m, other=0.0).to(SDT) + l2 * pi - gmean
                mi, vi = _moments(mp, vp, xp, i, m, d, b1, b2, SDT, AMSGRAD)
            u = mi / (tl.sqrt(vi) / bc2 + eps) - umean
            tl.store(p + i, (pi * decay - step * u).to(PDT), mask=m)


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _items(tab: np.ndarray) -> np.ndarray:
    """(tensor, begin, end) work items: whole rows for centralised tensors, ~_ITEM elements each."""
    out = []
    for t in range(tab.shape[0]):
        rows, row_len, gc = int(tab[t, 5]), int(tab[t, 6]), int(tab[t, 7])
        numel = rows * row_len
        if numel <= 0:
            continue
        step = max(1, _ITEM // row_len) * row_len if gc else _ITEM
        starts = np.arange(0, numel, step, dtype=np.int64)
        out.append(np.stack([np.full_like(starts, t), starts, np.minimum(starts + step, numel)], 1))
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":  # pinned + non_blocking: no host synchronisation
        return t.pin_memory().to(device, non_blocking=True)
    return t


def step(kind: str, prep, hyper) -> None:
    """Launches one multi-tensor step over prep.params (pyeccv.ops.grad_central._Prepared)."""
    device = prep.params[0].device
    pdt = prep.params[0].dtype
    sdt = torch.float64 if pdt == torch.float64 else torch.float32
    it = getattr(prep, "items_dev", None)  # cached by pyeccv.optim's plans: shapes do not change
    if it is None:
        items = _items(prep.tab)
        if items.shape[0] == 0:
            return
        it = _to_device(items, device)
        if hasattr(prep, "items_dev"):
            prep.items_dev = it
    tab = _to_device(prep.tab, device)
    sign = -1.0 if hyper["maximize"] else 1.0
    grid = (it.shape[0],)
    if kind == "sgd":
        _sgd_kernel[grid](it, tab, hyper["lr"], hyper["momentum"], 1.0 - hyper["dampening"], hyper["weight_decay"],
                          sign, PDT=_TL[pdt], SDT=_TL[sdt], HAS_BUF=hyper["momentum"] != 0,
                          NESTEROV=bool(hyper["nesterov"]), BLOCK=_BLOCK)
        return
    scal = _to_device(prep.scal, device)
    decoupled = hyper["decoupled"]
    _adam_kernel[grid](it, tab, scal, 1.0 - hyper["beta1"], hyper["beta2"], hyper["eps"],
                       0.0 if decoupled else hyper["weight_decay"],
                       1.0 - hyper["lr"] * hyper["weight_decay"] if decoupled else 1.0, sign,
                       PDT=_TL[pdt], SDT=_TL[sdt], AMSGRAD=bool(hyper["amsgrad"]), GC_UPDATE=bool(hyper["gc_update"]),
                       BLOCK=_BLOCK)
