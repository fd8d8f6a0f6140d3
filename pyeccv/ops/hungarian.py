"""Hungarian matching core (DETR, arXiv 2005.12872): batched exact linear assignment and the
DETR matching cost, as torch custom ops.

Ops (schema names are stable; see tests/ops/test_hungarian.py):
  pyeccv::lsap_batch_unchecked(cost, num_rows?, num_cols?, maximize) -> (col_for_row, status)
      never synchronises: statuses stay on the device (CUDA-graph and matcher friendly).
  pyeccv::lsap_batch(cost, num_rows?, num_cols?, maximize) -> col_for_row
      the same, then raises ValueError naming the first bad problem.
  pyeccv::detr_match_cost(...) -> (B, Q, Tmax) cost, +inf where t >= num_targets[b].
No gradients: assignment is piecewise constant and DETR builds its cost under no_grad.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _checks, interop

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
_NP_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_STATUS = {
    1: "matrix contains invalid numeric entries",
    2: "cost matrix is infeasible",
    3: "num_rows[{b}] is outside [0, {rows}]",
    4: "num_cols[{b}] is outside [0, {cols}]",
}


# ---------------------------------------------------------------------------------------------
# argument checks (shared by the public functions, the op and its fake)
# ---------------------------------------------------------------------------------------------
def _check_lsap(cost: Tensor, num_rows: Optional[Tensor], num_cols: Optional[Tensor]) -> None:
    _checks.tensor("cost", cost, ndim=3, dtypes=_checks.FLOATS)
    B = cost.shape[0]
    for name, x in (("num_rows", num_rows), ("num_cols", num_cols)):
        if x is None:
            continue
        _checks.tensor(name, x, shape=(B,), device=cost.device)
        if not _checks.is_int(x):
            raise ValueError(f"{name} must be an integer tensor, got {str(x.dtype).replace('torch.', '')}")


def _solver_dtype(cost: Tensor) -> Tensor:
    # float16 / bfloat16 values are exact in float32, so the optimum is unchanged.
    return cost if cost.dtype in _DTYPE_CODE else cost.to(torch.float32)


def _ptr(x: Optional[Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _lsap_native(cost: Tensor, num_rows: Optional[Tensor], num_cols: Optional[Tensor], maximize: bool,
                 team_size: int = 0) -> Tuple[Tensor, Tensor]:
    """Runs the compiled solver; team_size > 0 runs the CUDA algorithm on CPU threads (tests)."""
    C = _backend.C()
    cost = _solver_dtype(cost.resolve_neg().resolve_conj())
    B, N, M = cost.shape
    device = cost.device
    nr = None if num_rows is None else num_rows.to(torch.int64).contiguous()
    nc = None if num_cols is None else num_cols.to(torch.int64).contiguous()
    if device.type == "cuda" and not _backend.has_cuda_kernels():
        warnings.warn("pyeccv was built without CUDA kernels: solving on the CPU", RuntimeWarning, stacklevel=3)
        col, status = _lsap_native(cost.cpu(), None if nr is None else nr.cpu(), None if nc is None else nc.cpu(),
                                   maximize)
        return col.to(device), status.to(device)
    col = torch.empty((B, N), dtype=torch.int64, device=device)
    status = torch.empty((B,), dtype=torch.int32, device=device)
    if B == 0:
        return col, status
    args = (cost.data_ptr(), _DTYPE_CODE[cost.dtype], B, N, M, *cost.stride(), _ptr(nr), _ptr(nc), bool(maximize),
            col.data_ptr(), status.data_ptr())
    if device.type == "cpu":
        C.lsap_cpu(*args, torch.get_num_threads(), team_size)
    elif device.type == "cuda":
        nbytes = C.lsap_cuda_workspace_bytes(_DTYPE_CODE[cost.dtype], B, N, M)
        ws = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=device)
        C.lsap_cuda(*args, ws.data_ptr(), nbytes, device.index if device.index is not None else
                    torch.cuda.current_device(), _backend.cuda_stream(device))
    else:
        raise ValueError(f"cost must be on a CPU or CUDA device, got {device}")
    return col, status


def _raise_for_status(status, *, rows: int, cols: int, name: str = "cost", batched: bool = True) -> None:
    st = status.cpu().numpy() if isinstance(status, Tensor) else status
    if not st.any():
        return
    b = int(np.flatnonzero(st)[0])
    code = int(st[b])
    msg = _STATUS.get(code, f"solver returned unknown status {code}").format(b=b, rows=rows, cols=cols)
    if batched and code in (1, 2):
        msg = f"{name}[{b}]: {msg}"
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pyeccv::lsap_batch_unchecked", mutates_args=())
def lsap_batch_unchecked(cost: Tensor, num_rows: Optional[Tensor], num_cols: Optional[Tensor],
                         maximize: bool) -> Tuple[Tensor, Tensor]:
    _check_lsap(cost, num_rows, num_cols)
    return _lsap_native(cost, num_rows, num_cols, maximize)


@lsap_batch_unchecked.register_fake
def _(cost, num_rows, num_cols, maximize):
    _check_lsap(cost, num_rows, num_cols)
    B, N, _ = cost.shape
    return cost.new_empty((B, N), dtype=torch.int64), cost.new_empty((B,), dtype=torch.int32)


@torch.library.custom_op("pyeccv::lsap_batch", mutates_args=())
def lsap_batch(cost: Tensor, num_rows: Optional[Tensor], num_cols: Optional[Tensor], maximize: bool) -> Tensor:
    _check_lsap(cost, num_rows, num_cols)
    col, status = _lsap_native(cost, num_rows, num_cols, maximize)
    _raise_for_status(status, rows=cost.shape[1], cols=cost.shape[2])
    return col


@lsap_batch.register_fake
def _(cost, num_rows, num_cols, maximize):
    _check_lsap(cost, num_rows, num_cols)
    B, N, _ = cost.shape
    return cost.new_empty((B, N), dtype=torch.int64)


@torch.library.custom_op("pyeccv::lsap_single", mutates_args=())
def lsap_single(cost: Tensor, maximize: bool) -> Tensor:
    """One (N, M) problem, N <= M -> (N,) columns; SciPy's error messages."""
    _checks.tensor("cost", cost, ndim=2, dtypes=_checks.FLOATS)
    col, status = _lsap_native(cost.unsqueeze(0), None, None, maximize)
    _raise_for_status(status, rows=cost.shape[0], cols=cost.shape[1], batched=False)
    return col[0]


@lsap_single.register_fake
def _(cost, maximize):
    _checks.tensor("cost", cost, ndim=2, dtypes=_checks.FLOATS)
    return cost.new_empty((cost.shape[0],), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _sizes(name: str, x, B: int, device: torch.device) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x if len(x) else [], dtype=torch.int64)
    if x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},) (one size per problem), got {tuple(x.shape)}")
    if not _checks.is_int(x):
        raise ValueError(f"{name} must hold integers, got {str(x.dtype).replace('torch.', '')}")
    return x.to(device=device, dtype=torch.int64)


def batch_linear_sum_assignment(cost: Tensor, *, maximize: bool = False, num_rows=None, num_cols=None,
                                backend: str = "auto") -> Tensor:
    """Solves B assignment problems at once: (B, N, M) cost -> (B, N) int64 column of each row.

    Each problem b is cost[b, :num_rows[b], :num_cols[b]] (padding is ignored). A row that is not
    assigned (padding, or more rows than columns) gets -1. Same contract as
    scipy.optimize.linear_sum_assignment per problem: +inf (-inf with maximize) forbids a pair,
    NaN or -inf raises, an infeasible problem raises; errors name the batch index.
    float16 / bfloat16 / float32 / float64 costs; duals and sums are float64, so the total cost
    is SciPy's optimum. backend: "auto" | "native" (compiled CPU / CUDA) | "reference" (SciPy loop).
    """
    _backend.check_backend(backend)
    _checks.tensor("cost", cost, ndim=3, dtypes=_checks.FLOATS)
    B = cost.shape[0]
    nr = _sizes("num_rows", num_rows, B, cost.device)
    nc = _sizes("num_cols", num_cols, B, cost.device)
    if backend == "reference":
        from ..reference.hungarian import scipy_batch

        return scipy_batch(cost, maximize=maximize, num_rows=None if nr is None else nr.tolist(),
                           num_cols=None if nc is None else nc.tolist())
    if backend == "triton":
        raise ValueError("backend='triton': there is no Triton assignment solver (the CUDA one is native)")
    if cost.device.type == "cpu" and not torch.compiler.is_compiling():
        # Eager CPU: skip the dispatcher (~15 us a call) so small problems stay fast.
        _check_lsap(cost, nr, nc)
        col, status = _lsap_native(cost, nr, nc, maximize)
        _raise_for_status(status, rows=cost.shape[1], cols=cost.shape[2])
        return col
    return lsap_batch(cost, nr, nc, maximize)


def linear_sum_assignment(cost, maximize: bool = False, *, backend: str = "auto"):
    """Drop-in for scipy.optimize.linear_sum_assignment.

    cost: a 2-D torch tensor (any device), NumPy array, or any array with __dlpack__.
    Returns (row_ind, col_ind), int64, of the same kind as cost, rows sorted.
    """
    if type(cost) is np.ndarray and backend == "auto" and cost.ndim == 2 and cost.dtype in _NP_FLOATS:
        # NumPy in, NumPy out, no torch on the way: SciPy's per-call overhead, not the dispatcher's.
        return _backend.C().lsap_cpu_scipy(cost, bool(maximize))
    _backend.check_backend(backend)
    if backend == "reference":
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        t, back = interop.to_torch(cost)
        r, c = scipy_lsa(t.detach().cpu().numpy(), maximize=maximize)
        return back(torch.from_numpy(r).to(t.device)), back(torch.from_numpy(c).to(t.device))
    if isinstance(cost, np.ndarray) and cost.ndim == 2 and cost.dtype.kind in "fiub":
        a = cost.astype(np.float32 if cost.dtype == np.float16 else np.float64)  # SciPy's conversions
        return _backend.C().lsap_cpu_scipy(a, bool(maximize))
    t, back = interop.to_torch(cost)
    if t.dim() != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {t.dim()}-D array")
    if t.is_complex():
        raise ValueError("cost must be real-valued, got a complex array")
    if not t.is_floating_point():
        t = t.to(torch.float64)  # integers and booleans, as SciPy
    N, M = t.shape
    if N <= M:
        rows, cols = torch.arange(N, device=t.device), _solve_one(t, maximize)
    else:  # solve the wide transpose: static output shapes, no nonzero (torch.compile friendly)
        rows, cols = torch.sort(_solve_one(t.t(), maximize))
    return back(rows), back(cols)


def _solve_one(t: Tensor, maximize: bool) -> Tensor:
    """(N, M) with N <= M -> (N,) columns; raises SciPy's errors."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        col, status = _lsap_native(t.unsqueeze(0), None, None, maximize)
        _raise_for_status(status, rows=t.shape[0], cols=t.shape[1], batched=False)
        return col[0]
    return lsap_single(t, maximize)


# ---------------------------------------------------------------------------------------------
# DETR matching cost
# ---------------------------------------------------------------------------------------------
def _check_cost_args(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax) -> None:
    _checks.tensor("pred_logits", pred_logits, ndim=3, dtypes=_checks.FLOATS)
    B, Q, K = pred_logits.shape
    if K == 0:
        raise ValueError("pred_logits must have at least one class (last dim > 0)")
    dev = pred_logits.device
    _checks.tensor("pred_boxes", pred_boxes, shape=(B, Q, 4), dtypes=_checks.FLOATS, device=dev)
    _checks.tensor("tgt_labels", tgt_labels, ndim=1, device=dev)
    if not _checks.is_int(tgt_labels):
        raise ValueError(f"tgt_labels must be an integer tensor, got {str(tgt_labels.dtype).replace('torch.', '')}")
    T = tgt_labels.shape[0]
    _checks.tensor("tgt_boxes", tgt_boxes, shape=(T, 4), dtypes=_checks.FLOATS, device=dev)
    _checks.tensor("num_targets", num_targets, shape=(B,), device=dev)
    if tmax < 0:
        raise ValueError(f"tmax must be >= 0, got {tmax}")


def _check_labels(tgt_labels: Tensor, num_classes: int) -> None:
    """Labels index the logits: out of range would be a device assert on GPU. One sync."""
    if tgt_labels.numel() == 0:
        return
    lo, hi = int(tgt_labels.min()), int(tgt_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"tgt_labels must be in [0, {num_classes}) (pred_logits has {num_classes} classes), "
                         f"got values in [{lo}, {hi}]")


def _out_dtype(pred_logits: Tensor) -> torch.dtype:
    return torch.float64 if pred_logits.dtype == torch.float64 else torch.float32


def _cost_vectorized(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax, cost_class, cost_bbox,
                     cost_giou, focal, focal_alpha, focal_gamma) -> Tensor:
    """Per-image padded cost with batched tensor ops (any device): (B, Q, Tmax), +inf padding."""
    from ..reference.hungarian import box_cxcywh_to_xyxy

    dt = _out_dtype(pred_logits)
    B, Q, _ = pred_logits.shape
    dev = pred_logits.device
    counts = num_targets.to(torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    t_idx = torch.arange(tmax, device=dev)
    valid = t_idx[None, :] < counts[:, None]  # (B, Tmax)
    flat = torch.where(valid, offsets[:, None] + t_idx[None, :], torch.zeros_like(t_idx)[None, :])
    T = tgt_labels.shape[0]
    if T == 0:
        flat = torch.zeros_like(flat)
        labels = torch.zeros((B, tmax), dtype=torch.int64, device=dev)
        tboxes = torch.full((B, tmax, 4), 0.5, dtype=dt, device=dev)
    else:
        labels = tgt_labels.to(torch.int64)[flat]
        tboxes = tgt_boxes.to(dt)[flat]
    logits = pred_logits.to(dt)
    gidx = labels[:, None, :].expand(B, Q, tmax)
    if focal:
        p = torch.gather(logits, 2, gidx).sigmoid()
        neg = (1 - focal_alpha) * (p ** focal_gamma) * (-(1 - p + 1e-8).log())
        pos = focal_alpha * ((1 - p) ** focal_gamma) * (-(p + 1e-8).log())
        c_class = pos - neg
    else:
        c_class = -torch.gather(logits.softmax(-1), 2, gidx)
    boxes = pred_boxes.to(dt)
    c_bbox = (boxes[:, :, None, :] - tboxes[:, None, :, :]).abs().sum(-1)
    a = box_cxcywh_to_xyxy(boxes)[:, :, None, :]
    b = box_cxcywh_to_xyxy(tboxes)[:, None, :, :]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = ((torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)).prod(-1)
    union = area_a + area_b - inter
    hull = ((torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)).prod(-1)
    giou = inter / union - (hull - union) / hull
    C = cost_bbox * c_bbox + cost_class * c_class + cost_giou * (-giou)
    return C.masked_fill(~valid[:, None, :], float("inf"))


def _cost_cpu(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax, cost_class, cost_bbox, cost_giou,
              focal, focal_alpha, focal_gamma) -> Tensor:
    """The compiled CPU kernel: one fused pass per (image, query), OpenMP over them."""
    dt = _out_dtype(pred_logits)
    B, Q, K = pred_logits.shape
    out = torch.empty((B, Q, tmax), dtype=dt)
    if out.numel() == 0:
        return out
    logits, boxes, tboxes = pred_logits.to(dt), pred_boxes.to(dt), tgt_boxes.to(dt)
    labels = tgt_labels.to(torch.int64)
    counts = num_targets.to(torch.int64).contiguous()
    offsets = (torch.cumsum(counts, 0) - counts).contiguous()
    if labels.numel() == 0:
        labels, tboxes = torch.zeros(1, dtype=torch.int64), torch.full((1, 4), 0.5, dtype=dt)
    _backend.C().detr_cost_cpu(_DTYPE_CODE[dt], B, Q, K, tmax, logits.data_ptr(), *logits.stride(),
                               boxes.data_ptr(), *boxes.stride(), labels.data_ptr(), labels.stride(0),
                               tboxes.data_ptr(), *tboxes.stride(), counts.data_ptr(), offsets.data_ptr(),
                               cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma, out.data_ptr(),
                               torch.get_num_threads())
    return out


def _cost_native(*args) -> Tensor:
    """Compiled C++ on CPU; batched torch ops elsewhere (CUDA without Triton)."""
    return _cost_cpu(*args) if args[0].device.type == "cpu" else _cost_vectorized(*args)


@torch.library.custom_op("pyeccv::detr_match_cost", mutates_args=())
def detr_match_cost_op(pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                       num_targets: Tensor, tmax: int, cost_class: float, cost_bbox: float, cost_giou: float,
                       focal: bool, focal_alpha: float, focal_gamma: float) -> Tensor:
    _check_cost_args(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax)
    _check_labels(tgt_labels, pred_logits.shape[2])
    args = (pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax, cost_class, cost_bbox, cost_giou,
            focal, focal_alpha, focal_gamma)
    if pred_logits.device.type == "cuda" and _backend.has_triton():
        return _backend.kernels("hungarian").detr_match_cost(*args)
    return _cost_native(*args)


@detr_match_cost_op.register_fake
def _(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax, cost_class, cost_bbox, cost_giou, focal,
      focal_alpha, focal_gamma):
    _check_cost_args(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax)
    B, Q, _ = pred_logits.shape
    return pred_logits.new_empty((B, Q, tmax), dtype=_out_dtype(pred_logits))


def _num_targets(num_targets, B: int, T: int, device) -> Tuple[List[int], Tensor]:
    counts = num_targets.tolist() if isinstance(num_targets, Tensor) else [int(x) for x in num_targets]
    if len(counts) != B:
        raise ValueError(f"num_targets must have one count per image ({B}), got {len(counts)}")
    if any(c < 0 for c in counts):
        raise ValueError("num_targets must be >= 0")
    if sum(counts) != T:
        raise ValueError(f"num_targets must sum to the number of targets ({T}), got {sum(counts)}")
    return counts, torch.tensor(counts, dtype=torch.int64, device=device)


def detr_match_cost(pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                    num_targets: Union[Sequence[int], Tensor], *, cost_class: float = 1.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0, focal: bool = False, focal_alpha: float = 0.25,
                    focal_gamma: float = 2.0, backend: str = "auto") -> Tensor:
    """DETR's matching cost, per image, padded: (B, Q, max T) with +inf beyond num_targets[b].

    pred_logits (B, Q, K), pred_boxes (B, Q, 4) cxcywh; tgt_labels (sum T,) and tgt_boxes
    (sum T, 4) cxcywh are the targets of all images concatenated, num_targets[b] of image b.
    Class cost: -softmax probability (DETR) or, with focal=True, the focal cost of
    Deformable-DETR / DINO. Plus cost_bbox * L1 + cost_giou * (-GIoU). Never builds the
    (B*Q) x (sum T) matrix of the official code. float32 out (float64 for float64 logits).
    backend: "auto" (Triton on CUDA, C++ on CPU) | "native" (C++ on CPU, batched torch ops on CUDA) |
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1) | "reference" (the official cost, split).
    """
    _backend.check_backend(backend)
    _checks.tensor("pred_logits", pred_logits, ndim=3, dtypes=_checks.FLOATS)
    _checks.tensor("tgt_labels", tgt_labels, ndim=1)
    B = pred_logits.shape[0]
    counts, nt = _num_targets(num_targets, B, tgt_labels.shape[0], pred_logits.device)
    tmax = max(counts, default=0)
    kw = dict(cost_class=float(cost_class), cost_bbox=float(cost_bbox), cost_giou=float(cost_giou),
              focal=bool(focal), focal_alpha=float(focal_alpha), focal_gamma=float(focal_gamma))
    args = (pred_logits, pred_boxes, tgt_labels, tgt_boxes, nt, tmax)
    if backend == "reference":
        from ..reference.hungarian import padded_cost

        _check_cost_args(*args)
        return padded_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, counts, **kw).to(_out_dtype(pred_logits))
    if backend == "native":
        _check_cost_args(*args)
        _check_labels(tgt_labels, pred_logits.shape[2])
        return _cost_native(*args, *kw.values())
    if backend == "triton":
        _check_cost_args(*args)
        _check_labels(tgt_labels, pred_logits.shape[2])
        if not _backend.triton_usable(pred_logits.device):
            raise ValueError("backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        return _backend.kernels("hungarian").detr_match_cost(*args, *kw.values())
    return detr_match_cost_op(*args, *kw.values())
