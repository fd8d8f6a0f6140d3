"""Dynamic Group Convolution (Su et al., ECCV 2020, arXiv 2007.04242) as torch custom ops: the
official masked multi-head convolution, computed on the kept channels only.

Ops (schemas are stable; see tests/ops/test_dyn_group_conv.py):
  pyeccv::dyn_group_conv_fwd(x, weight, saliency, keep, stride, padding, dilation, backend) -> out
  pyeccv::dyn_group_conv_bwd(g, x, weight, saliency, keep, stride, padding, dilation, backend)
      -> (d_x, d_weight, d_saliency)
Semantics (official layers.py, see pyeccv.reference.dyn_group_conv): per sample b and head h, with
d = C_in - keep, the threshold t is the d-th smallest saliency (the largest of the d smallest) and
the kept channels are those with saliency > t (ties at t are all dropped; d = 0 keeps every channel);
head h convolves x * saliency over its kept channels with its filters (weight rows
[h * C_out / heads, (h + 1) * C_out / heads)); output channel j * heads + h is head h's filter j.

Torch gather path ("torch"; "auto" without Triton off CPU): one descending sort per (b, h) gives the top-`keep` indices and
t (the (keep + 1)-th largest); the gathered scale is saliency * (saliency > t), so channels tied at t
inside the top-`keep` get scale 0 (exactly the official drop). The kept input channels (scaled) are
gathered to (1, B * heads * keep, H, W), the matching filter columns to
(B * C_out, keep, k, k), and ONE conv2d with groups = B * heads computes every (sample, head).
MACs: keep / C_in of the official computation (which does the dense conv's MACs, on heads masked
copies of the input).
C++ path ("auto" / "native" on CPU): csrc/cpu/dyn_group_conv.cpp, an implicit GEMM per (sample,
head) over the kept channels (float32 / float64; half types computed in float32). Triton path
("auto" on CUDA, "triton"): kernels/dyn_group_conv.py, the selection fused into the conv launch.
The torch path's backward recomputes the gathers and uses the conv2d input / weight gradients; pruned channels
get exactly zero gradient (x, weight columns and saliency), as in the official graph.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend, _checks

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CODE = {torch.float32: 0, torch.float64: 1}
BACKENDS = ("auto", "native", "triton", "torch")


def _pair(name: str, v) -> List[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        vals = [v, v]
    else:
        vals = list(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, int) for a in vals):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return vals


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check(x, weight, saliency, keep, stride, padding, dilation) -> Tuple[int, int]:
    """Metadata checks (shapes, dtypes, devices, ranges); returns (H_out, W_out)."""
    _checks.tensor("x", x, ndim=4, dtypes=_FLOATS)
    B, C, H, W = x.shape
    _checks.tensor("weight", weight, ndim=4, dtypes=_FLOATS, device=x.device)
    _checks.tensor("saliency", saliency, ndim=3, dtypes=_FLOATS, device=x.device)
    for name, t in (("weight", weight), ("saliency", saliency)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    C_out, C_w, kh, kw = weight.shape
    if C_w != C:
        raise ValueError(f"weight must have shape (C_out, {C}, kh, kw) for x with {C} channels, got "
                         f"{tuple(weight.shape)}")
    heads = saliency.shape[1]
    if saliency.shape[0] != B or saliency.shape[2] != C or heads < 1:
        raise ValueError(f"saliency must have shape ({B}, heads, {C}) with heads >= 1, got {tuple(saliency.shape)}")
    if C_out % heads != 0:
        raise ValueError(f"weight's C_out = {C_out} must be divisible by heads = {heads} (saliency.shape[1])")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= C:
        raise ValueError(f"keep must be an int in [1, C_in = {C}], got {keep!r}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(a < lo for a in v):
            raise ValueError(f"{name} must be a pair of ints >= {lo}, got {list(v)}")
    ho = _out_size(H, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(W, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"output would be empty: input {H}x{W}, kernel {kh}x{kw}, stride {stride}, padding "
                         f"{padding}, dilation {dilation}")
    return ho, wo


def _check_values(saliency: Tensor) -> None:
    if saliency.numel() and bool((saliency.isnan() | (saliency < 0)).any()):
        raise ValueError("saliency must be non-negative (the official saliency is a ReLU output) and not NaN")


def _select(saliency: Tensor, keep: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-`keep` channel indices (B, heads, keep) int64, the gathered saliency and the official
    keep mask (saliency > the largest dropped one) on those."""
    C = saliency.shape[2]
    if keep == C:  # official: no thresholding at all
        idx = torch.arange(C, device=saliency.device).expand(saliency.shape).contiguous()
        return idx, saliency, torch.ones_like(saliency, dtype=torch.bool)
    vals, idx = torch.sort(saliency, dim=2, descending=True)
    thr = vals[:, :, keep:keep + 1]  # the (keep+1)-th largest = the largest of the C - keep smallest
    top = vals[:, :, :keep]
    return idx[:, :, :keep].contiguous(), top, top > thr


def _gather(x: Tensor, weight: Tensor, saliency: Tensor, keep: int):
    """x_g (1, B*heads*keep, H, W) scaled, w_g (B*C_out, keep, kh, kw), the unscaled gathered x,
    flat indices into x's (B*C) channels and weight's (heads*C) columns, the scale and the keep mask."""
    B, C, H, W = x.shape
    heads = saliency.shape[1]
    C_out, _, kh, kw = weight.shape
    co = C_out // heads
    idx, top, kept = _select(saliency, keep)
    scale = top * kept
    b_off = (torch.arange(B, device=x.device) * C).view(B, 1, 1)
    h_off = (torch.arange(heads, device=x.device) * C).view(1, heads, 1)
    x_rows = (idx + b_off).reshape(-1)
    w_rows = (idx + h_off).reshape(-1)
    x_raw = x.reshape(B * C, H, W).index_select(0, x_rows)
    x_g = x_raw * scale.reshape(-1, 1, 1)
    # weight columns as rows: (heads * C, co * kh * kw), row h * C + c = head h's filters on channel c
    w_t = weight.reshape(heads, co, C, kh * kw).transpose(1, 2).reshape(heads * C, co * kh * kw)
    w_g = w_t.index_select(0, w_rows).view(B, heads, keep, co, kh * kw).transpose(2, 3)
    w_g = w_g.reshape(B * heads * co, keep, kh, kw)
    return x_g.view(1, B * heads * keep, H, W), w_g, x_raw, x_rows, w_rows, scale, kept


def _interleave(out: Tensor, B: int, heads: int) -> Tensor:
    """(1, B * heads * co, H, W) head-major -> (B, co * heads, H, W), channel j * heads + h."""
    _, n, ho, wo = out.shape
    co = n // (B * heads)
    return out.view(B, heads, co, ho, wo).transpose(1, 2).reshape(B, co * heads, ho, wo)


def _forward_torch(x, weight, saliency, keep, stride, padding, dilation) -> Tensor:
    B, heads = x.shape[0], saliency.shape[1]
    x_g, w_g, *_ = _gather(x, weight, saliency, keep)
    out = torch.nn.functional.conv2d(x_g, w_g, None, stride, padding, dilation, B * heads)
    return _interleave(out, B, heads)


def _backward_torch(g, x, weight, saliency, keep, stride, padding, dilation):
    B, C, H, W = x.shape
    heads = saliency.shape[1]
    C_out, _, kh, kw = weight.shape
    co = C_out // heads
    x_g, w_g, x_raw, x_rows, w_rows, scale, kept = _gather(x, weight, saliency, keep)
    ho, wo = g.shape[2], g.shape[3]
    g_hm = g.reshape(B, co, heads, ho, wo).transpose(1, 2).reshape(1, B * C_out, ho, wo)
    groups = B * heads
    d_xg = torch.nn.grad.conv2d_input(x_g.shape, w_g, g_hm, stride, padding, dilation, groups)
    d_wg = torch.nn.grad.conv2d_weight(x_g, w_g.shape, g_hm, stride, padding, dilation, groups)
    d_xg = d_xg.view(B * heads * keep, H, W)
    # saliency: d/ds of x * s on the kept channels = sum_hw x * d_xg (zero on ties and pruned)
    d_top = torch.bmm(x_raw.view(-1, 1, H * W), d_xg.view(-1, H * W, 1)).view(B, heads, keep) * kept
    idx = x_rows.view(B, heads, keep) - (torch.arange(B, device=x.device) * C).view(B, 1, 1)
    d_s = torch.zeros_like(saliency).scatter_(2, idx, d_top.to(saliency.dtype))
    # x: heads may pick the same channel, so accumulate
    d_x = torch.zeros((B * C, H, W), dtype=x.dtype, device=x.device)
    d_x.index_put_((x_rows,), (d_xg * scale.reshape(-1, 1, 1)).to(x.dtype), accumulate=True)  # CPU: ~5x index_add_
    # weight: samples pick the same columns, so accumulate
    d_wt = torch.zeros((heads * C, co * kh * kw), dtype=weight.dtype, device=weight.device)
    d_wr = d_wg.view(B, heads, co, keep, kh * kw).transpose(2, 3).reshape(B * heads * keep, co * kh * kw)
    d_wt.index_put_((w_rows,), d_wr.to(weight.dtype), accumulate=True)
    d_w = d_wt.view(heads, C, co, kh * kw).transpose(1, 2).reshape(C_out, C, kh, kw)
    return d_x.view(B, C, H, W), d_w, d_s


def _path(device: torch.device, backend: str) -> str:
    """Which implementation runs: "triton" (CUDA tensors, or asked for under the interpreter),
    "native" (the C++ CPU kernels) or "torch" (the gather + grouped conv2d path, any device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        _backend.use_triton(device, "triton", "dyn_group_conv")  # raises where Triton cannot run
        return "triton"
    if device.type == "cpu":
        return "native"
    if backend == "native":
        raise ValueError(f"backend='native' runs on CPU tensors, got {device.type} tensors (use 'auto' or 'triton')")
    if device.type == "cuda" and _backend.has_triton():
        return "triton"
    return "torch"  # no Triton (or another device): the gather path still skips the pruned channels


def _native_args(x, weight, saliency, keep, stride, padding, dilation):
    B, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    return (_CODE[x.dtype], B, C, H, W, C_out, saliency.shape[1], kh, kw, keep, stride[0], stride[1], padding[0],
            padding[1], dilation[0], dilation[1], x.data_ptr(), weight.data_ptr(), saliency.data_ptr())


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The C++ kernels compute in float32 / float64; half types are widened to float32 and the
    results rounded back (the GEMM accumulates in float32 either way)."""
    return x.dtype if x.dtype in _CODE else torch.float32


def _forward_native(x, weight, saliency, keep, stride, padding, dilation) -> Tensor:
    ct = _compute_dtype(x)
    xc, wc, sc = (t.to(ct).contiguous() for t in (x, weight, saliency))
    ho, wo = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]), \
        _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    out = torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=ct)
    _backend.C().dgc_forward_cpu(*_native_args(xc, wc, sc, keep, stride, padding, dilation), out.data_ptr(),
                                 torch.get_num_threads())
    return out.to(x.dtype)


def _backward_native(g, x, weight, saliency, keep, stride, padding, dilation):
    ct = _compute_dtype(x)
    gc, xc, wc, sc = (t.to(ct).contiguous() for t in (g, x, weight, saliency))
    d_x, d_w, d_s = torch.empty_like(xc), torch.empty_like(wc), torch.empty_like(sc)
    _backend.C().dgc_backward_cpu(*_native_args(xc, wc, sc, keep, stride, padding, dilation), gc.data_ptr(),
                                  d_x.data_ptr(), d_w.data_ptr(), d_s.data_ptr(), torch.get_num_threads())
    return d_x.to(x.dtype), d_w.to(weight.dtype), d_s.to(saliency.dtype)


@torch.library.custom_op("pyeccv::dyn_group_conv_fwd", mutates_args=())
def dyn_group_conv_fwd(x: Tensor, weight: Tensor, saliency: Tensor, keep: int, stride: List[int],
                       padding: List[int], dilation: List[int], backend: str) -> Tensor:
    ho, wo = _check(x, weight, saliency, keep, stride, padding, dilation)
    path = _path(x.device, backend)
    if path != "native":  # the C++ kernels check the values in their own pass (ValueError)
        _check_values(saliency)  # on CUDA: one host read (no device asserts, no silent garbage)
    if x.shape[0] == 0:
        return x.new_zeros((0, weight.shape[0], ho, wo))
    x, weight, saliency = x.detach(), weight.detach(), saliency.detach()
    if path == "native":
        return _forward_native(x, weight, saliency, keep, stride, padding, dilation)
    if path == "triton":
        with _device(x):
            return _backend.kernels("dyn_group_conv").forward(x.contiguous(), weight.contiguous(),
                                                              saliency.contiguous(), keep, stride, padding, dilation)
    return _forward_torch(x, weight, saliency, keep, stride, padding, dilation)


@dyn_group_conv_fwd.register_fake
def _(x, weight, saliency, keep, stride, padding, dilation, backend):
    ho, wo = _check(x, weight, saliency, keep, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo))


def _device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("pyeccv::dyn_group_conv_bwd", mutates_args=())
def dyn_group_conv_bwd(g: Tensor, x: Tensor, weight: Tensor, saliency: Tensor, keep: int, stride: List[int],
                       padding: List[int], dilation: List[int], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    ho, wo = _check(x, weight, saliency, keep, stride, padding, dilation)
    _checks.tensor("g", g, shape=(x.shape[0], weight.shape[0], ho, wo), dtypes=_FLOATS, device=x.device)
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(saliency)
    g, x, weight, saliency = g.detach().to(x.dtype), x.detach(), weight.detach(), saliency.detach()
    path = _path(x.device, backend)
    if path == "native":
        return _backward_native(g, x, weight, saliency, keep, stride, padding, dilation)
    if path == "triton":
        with _device(x):
            return _backend.kernels("dyn_group_conv").backward(g.contiguous(), x.contiguous(), weight.contiguous(),
                                                               saliency.contiguous(), keep, stride, padding, dilation)
    return _backward_torch(g, x, weight, saliency, keep, stride, padding, dilation)


@dyn_group_conv_bwd.register_fake
def _(g, x, weight, saliency, keep, stride, padding, dilation, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(saliency)


def _setup(ctx, inputs, output):
    x, weight, saliency, keep, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, weight, saliency)
    ctx.args = (keep, stride, padding, dilation, backend)


def _backward(ctx, g):
    x, weight, saliency = ctx.saved_tensors
    d_x, d_w, d_s = dyn_group_conv_bwd(g.contiguous(), x, weight, saliency, *ctx.args)
    return d_x, d_w, d_s, None, None, None, None, None


dyn_group_conv_fwd.register_autograd(_backward, setup_context=_setup)


def dyn_group_conv2d(x: Tensor, weight: Tensor, saliency: Tensor, *, keep: int,
                     stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                     dilation: Union[int, Sequence[int]] = 1, backend: str = "auto") -> Tensor:
    """DGC's saliency-gated multi-head convolution (official DynamicMultiHeadConv after BN-ReLU).

    x (B, C_in, H, W); weight (C_out, C_in, kh, kw), head h owning rows [h * C_out / heads,
    (h + 1) * C_out / heads); saliency (B, heads, C_in) >= 0; keep: channels kept per head, in
    [1, C_in]. Per (b, h): channels with saliency > the largest of the C_in - keep smallest are kept
    (the official tie rule: ties at that threshold are dropped too), scaled by their saliency, and
    convolved with head h's filters; output (B, C_out, H', W') with channel j * heads + h = head h's
    filter j (the official interleaving). Differentiable w.r.t. x, weight and saliency.
    backend: "auto" (Triton on CUDA, C++ on CPU) | "native" (C++, CPU) | "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1) | "torch" (gather + one grouped conv2d, any device). The dense
    official computation: pyeccv.reference.dyn_group_conv.masked_dyn_group_conv2d.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (channels kept per head), got {keep!r}")
    return dyn_group_conv_fwd(x, weight, saliency, keep, _pair("stride", stride), _pair("padding", padding),
                              _pair("dilation", dilation), backend)
