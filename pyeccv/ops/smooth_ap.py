"""Smooth-AP (Brown et al., ECCV 2020, arXiv 2007.12163) as torch custom ops.

Ops (schemas are stable; see tests/ops/test_smooth_ap.py):
  pyeccv::smooth_ap_fwd(queries, items, labels, query_index, temperature, paper, backend)
      -> (ap (Q,), valid (Q,) bool, S (Q, B)): each query ranked against all items, O(B) memory a
      query besides S = queries items^T (kept for the backward).
  pyeccv::smooth_ap_bwd(grad_ap, S, queries, items, labels, query_index, temperature, paper, backend)
      -> (d queries, d items): the analytic gradient (dS from the sigmoid slopes, computed by a
      kernel), then dQ = dS items, dI = dS^T queries; when queries and items are one tensor X,
      a single matmul dX = (dS + dS^T) X.
S is formed in float32 (float64 for float64 inputs) whatever the embedding dtype: with tau = 0.01 a
bf16 similarity would move sigmoid arguments by about 0.4.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _backend, _checks

FORMULATIONS = ("official", "paper")
_CODE = {torch.float32: 0, torch.float64: 1}


def _check_args(embeddings: Tensor, labels: Tensor, temperature: float, formulation: str) -> None:
    _checks.tensor("embeddings", embeddings, ndim=2, dtypes=_checks.FLOATS)
    B, D = embeddings.shape
    if B == 0:
        raise ValueError("embeddings must hold at least one sample, got shape (0, D)")
    if D == 0:
        raise ValueError(f"embeddings must have D > 0 features, got shape {tuple(embeddings.shape)}")
    _checks.tensor("labels", labels, ndim=1, device=embeddings.device)
    if not _checks.is_int(labels):
        raise ValueError(f"labels must be an integer tensor, got {str(labels.dtype).replace('torch.', '')}")
    if labels.shape[0] != B:
        raise ValueError(f"labels must have one label per embedding ({B}), got {labels.shape[0]}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def _check_op(queries, items, labels, query_index, temperature) -> None:
    _checks.tensor("queries", queries, ndim=2, dtypes=_checks.FLOATS)
    _checks.tensor("items", items, ndim=2, dtypes=_checks.FLOATS, device=queries.device)
    if items.shape[1] != queries.shape[1]:
        raise ValueError(f"queries and items must have the same feature size, got {queries.shape[1]} and "
                         f"{items.shape[1]}")
    _checks.tensor("labels", labels, shape=(items.shape[0],), device=queries.device)
    _checks.tensor("query_index", query_index, shape=(queries.shape[0],), device=queries.device)
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _sim_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sim(queries: Tensor, items: Tensor) -> Tensor:
    dt = _sim_dtype(queries)
    return queries.to(dt) @ items.to(dt).t()


def _positives(labels: Tensor, query_index: Tensor):
    """Items sorted by label; for each query the segment of its own label (itself included)."""
    labels = labels.to(torch.int64).contiguous()
    perm = torch.argsort(labels, stable=True)
    sorted_labels = labels[perm].contiguous()
    qi = query_index.to(torch.int64).contiguous()
    lq = labels[qi]
    start = torch.searchsorted(sorted_labels, lq, side="left")
    count = torch.searchsorted(sorted_labels, lq, side="right") - start
    return labels, qi, perm.contiguous(), start.contiguous(), count.contiguous()


def _use_triton(device, backend) -> bool:
    return _backend.use_triton(device, backend, "Smooth-AP")


def _ap(S, pos, temperature, paper, backend) -> Tensor:
    labels, qi, perm, start, count = pos
    if _use_triton(S.device, backend):
        return _backend.kernels("smooth_ap").ranks(S, labels, qi, perm, start, count, temperature, paper)[0]
    Q, B = S.shape
    ap = torch.empty(Q, dtype=S.dtype)
    _backend.C().smooth_ap_forward_cpu(_CODE[S.dtype], Q, B, S.data_ptr(), S.stride(0), labels.data_ptr(),
                                       qi.data_ptr(), perm.data_ptr(), start.data_ptr(), count.data_ptr(),
                                       float(temperature), bool(paper), ap.data_ptr(), torch.get_num_threads())
    return ap


def _dsim(S, pos, grad_ap, temperature, paper, backend) -> Tensor:
    labels, qi, perm, start, count = pos
    if _use_triton(S.device, backend):
        return _backend.kernels("smooth_ap").grad(S, labels, qi, perm, start, count, grad_ap, temperature, paper)
    Q, B = S.shape
    g = grad_ap.to(S.dtype).contiguous()
    dS = torch.empty((Q, B), dtype=S.dtype)
    _backend.C().smooth_ap_backward_cpu(_CODE[S.dtype], Q, B, S.data_ptr(), S.stride(0), labels.data_ptr(),
                                        qi.data_ptr(), perm.data_ptr(), start.data_ptr(), count.data_ptr(),
                                        float(temperature), bool(paper), g.data_ptr(), dS.data_ptr(),
                                        torch.get_num_threads())
    return dS


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pyeccv::smooth_ap_fwd", mutates_args=())
def smooth_ap_fwd(queries: Tensor, items: Tensor, labels: Tensor, query_index: Tensor, temperature: float,
                  paper: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _check_op(queries, items, labels, query_index, temperature)
    S = _sim(queries, items)
    pos = _positives(labels, query_index)
    valid = (pos[4] - int(paper)) > 0
    # one host read for every value check: NaN / inf, and at least one query with a positive
    flags = torch.stack([torch.isfinite(queries).all(), torch.isfinite(items).all(), valid.any()]).cpu()
    if not (bool(flags[0]) and bool(flags[1])):
        raise ValueError("embeddings contains NaN or inf")
    if not bool(flags[2]):
        raise ValueError("no valid query: with formulation='paper' a query needs another sample of its label "
                         "in the batch, and here every label has a single sample")
    return _ap(S, pos, temperature, paper, backend), valid, S


@smooth_ap_fwd.register_fake
def _(queries, items, labels, query_index, temperature, paper, backend):
    _check_op(queries, items, labels, query_index, temperature)
    Q, B = queries.shape[0], items.shape[0]
    dt = _sim_dtype(queries)
    return (queries.new_empty((Q,), dtype=dt), queries.new_empty((Q,), dtype=torch.bool),
            queries.new_empty((Q, B), dtype=dt))


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@torch.library.custom_op("pyeccv::smooth_ap_bwd", mutates_args=())
def smooth_ap_bwd(grad_ap: Tensor, S: Tensor, queries: Tensor, items: Tensor, labels: Tensor, query_index: Tensor,
                  temperature: float, paper: bool, backend: str) -> Tuple[Tensor, Tensor]:
    _check_op(queries, items, labels, query_index, temperature)
    _checks.tensor("S", S, shape=(queries.shape[0], items.shape[0]), device=queries.device)
    S = S.contiguous()
    dS = _dsim(S, _positives(labels, query_index), grad_ap, temperature, paper, backend)
    dt = S.dtype
    if _same(queries, items):  # S = X X^T: dX = (dS + dS^T) X, one matmul
        d = ((dS + dS.t()) @ items.to(dt)).to(queries.dtype)
        return d, torch.zeros_like(items)
    d_queries = (dS @ items.to(dt)).to(queries.dtype)  # S = Q I^T: dQ = dS I, dI = dS^T Q
    d_items = (dS.t() @ queries.to(dt)).to(items.dtype)
    return d_queries, d_items


@smooth_ap_bwd.register_fake
def _(grad_ap, S, queries, items, labels, query_index, temperature, paper, backend):
    return torch.empty_like(queries), torch.empty_like(items)


def _setup_context(ctx, inputs, output):
    queries, items, labels, query_index, temperature, paper, backend = inputs
    _, valid, S = output
    ctx.mark_non_differentiable(valid, S)
    ctx.save_for_backward(S, queries, items, labels, query_index)
    ctx.args = (temperature, paper, backend)


def _backward(ctx, grad_ap, grad_valid, grad_S):
    S, queries, items, labels, query_index = ctx.saved_tensors
    d_queries, d_items = smooth_ap_bwd(grad_ap.contiguous(), S, queries, items, labels, query_index, *ctx.args)
    return d_queries, d_items, None, None, None, None, None


smooth_ap_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def mean_ap_loss(ap: Tensor, valid: Tensor) -> Tensor:
    """1 - mean AP over the valid queries."""
    v = valid.to(ap.dtype)
    return 1 - (ap * v).sum() / v.sum()


def smooth_ap_loss(embeddings: Tensor, labels: Tensor, *, temperature: float = 0.01,
                   formulation: str = "official", backend: str = "auto") -> Tensor:
    """Smooth-AP loss, 1 - mean over queries of the smoothed average precision.

    embeddings (B, D) float32 / bfloat16 / float16 / float64, used as given (S = X X^T: normalise
    first for cosine similarity); labels (B,) integers in any order, classes of any size.
    formulation "official" reproduces Andrew-Brown1/Smooth_AP (the query inside its own retrieval
    and positive sets); "paper" excludes it (queries without another positive leave the mean).
    Differentiable w.r.t. embeddings. Never forms a B x B x B tensor: O(B) memory per query.
    Returns a float32 scalar (float64 for float64 embeddings).
    backend: "auto" (C++ on CPU, Triton on CUDA) | "native" | "triton" | "reference" (loop).
    """
    _backend.check_backend(backend)
    _check_args(embeddings, labels, temperature, formulation)
    if backend == "reference":
        from ..reference.smooth_ap import loop_smooth_ap

        return loop_smooth_ap(embeddings.to(_sim_dtype(embeddings)), labels, float(temperature), formulation)
    if backend == "native" and embeddings.device.type == "cuda":
        raise ValueError("backend='native': the CUDA path of Smooth-AP is the Triton kernel (backend='triton')")
    B = embeddings.shape[0]
    ap, valid, _ = smooth_ap_fwd(embeddings, embeddings, labels, torch.arange(B, device=embeddings.device),
                                 float(temperature), formulation == "paper", backend)
    return mean_ap_loss(ap, valid)
