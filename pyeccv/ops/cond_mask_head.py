"""CondInst's dynamic mask head (Tian et al., ECCV 2020, arXiv 2003.05664) as torch custom ops: the
per-instance MLP of 1x1 convolutions over the shared mask features, without copying the features
per instance (AdelaiDet's grouped conv2d does) or storing the hidden activations.

Ops (schemas are stable; see tests/ops/test_cond_mask_head.py):
  pyeccv::cond_mask_head_fwd(feats, params, im_inds, locations, soi, feat_stride, num_layers,
      channels, rel_coords, deterministic, backend) -> logits (I, H, W)
  pyeccv::cond_mask_head_bwd(g, feats, params, im_inds, locations, soi, feat_stride, num_layers,
      channels, rel_coords, deterministic, backend) -> (d_feats, d_params)
Semantics (AdelaiDet's DynamicMaskHead, exactly): csrc/include/pyeccv/cond_mask_head.h.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _backend, _checks

_CODE = {torch.float32: 0, torch.float64: 1}
_FEATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def num_gen_params(in_channels: int = 8, channels: int = 8, num_layers: int = 3, rel_coords: bool = True) -> int:
    """The number of dynamic parameters per instance (AdelaiDet's num_gen_params): 169 for the
    defaults (8 mask-feature channels + 2 coordinates -> 8 -> 8 -> 1)."""
    _check_net(in_channels, channels, num_layers)
    cin = in_channels + (2 if rel_coords else 0)
    dims = [cin] + [channels] * (num_layers - 1) + [1]
    return sum(dims[k] * dims[k + 1] + dims[k + 1] for k in range(num_layers))


def _check_net(in_channels, channels, num_layers) -> None:
    for name, v, lo in (("in_channels", in_channels, 1), ("channels", channels, 1), ("num_layers", num_layers, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}"
                             + (" (AdelaiDet's parameter layout needs at least 2 layers)" if name == "num_layers" else ""))
    if num_layers > 16:
        raise ValueError(f"num_layers must be <= 16, got {num_layers}")


def _check(feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords) -> None:
    _checks.tensor("mask_feats", feats, ndim=4, dtypes=_FEATS)
    N, C, H, W = feats.shape
    dev = feats.device
    _check_net(int(C), channels, num_layers)
    P = num_gen_params(int(C), channels, num_layers, rel_coords)
    _checks.tensor("params", params, ndim=2, dtypes=_FEATS, device=dev)
    I = params.shape[0]
    if params.shape[1] != P:
        raise ValueError(f"params must have num_gen_params = {P} columns for {C} feature channels, {num_layers} "
                         f"layers of {channels} channels{'' if rel_coords else ' without relative coordinates'}; "
                         f"got {params.shape[1]}")
    _checks.tensor("im_inds", im_inds, ndim=1, device=dev)
    if not _checks.is_int(im_inds) or im_inds.shape[0] != I:
        raise ValueError(f"im_inds must be an integer tensor of shape ({I},) (one image index per instance), got "
                         f"{tuple(im_inds.shape)} {str(im_inds.dtype).replace('torch.', '')}")
    _checks.tensor("locations", locations, shape=(I, 2), dtypes=_FEATS, device=dev)
    _checks.tensor("soi", soi, shape=(I,), dtypes=_FEATS, device=dev)
    if isinstance(feat_stride, bool) or not isinstance(feat_stride, int) or feat_stride < 1:
        raise ValueError(f"feat_stride must be a positive int, got {feat_stride!r}")


def _check_values(feats, im_inds, soi) -> None:
    """im_inds in range, soi positive: one host read."""
    N = feats.shape[0]
    if im_inds.numel() == 0:
        return
    flags = torch.stack([(im_inds < 0).any() | (im_inds >= N).any(), (soi <= 0).any()]).cpu()
    if bool(flags[0]):
        i = int(torch.nonzero((im_inds < 0) | (im_inds >= N))[0])
        raise ValueError(f"im_inds[{i}] = {int(im_inds[i])} is out of range for {N} images")
    if bool(flags[1]):
        raise ValueError("soi must be positive (the size of interest of each instance's FPN level)")


def _use_triton(device, backend) -> bool:
    return _backend.use_triton(device, backend, "cond_mask_head")


def _native_args(feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords):
    N, C, H, W = feats.shape
    return dict(dtype=_CODE[feats.dtype], images=N, in_channels=C, height=H, width=W, instances=params.shape[0],
                num_layers=num_layers, channels=channels, rel_coords=rel_coords, stride=feat_stride,
                feats=feats.data_ptr(), params=params.data_ptr(), im_inds=im_inds.data_ptr(),
                locations=locations.data_ptr(), soi=soi.data_ptr())


def _prep(feats, params, im_inds, locations, soi, triton):
    """Contiguous inputs in the compute dtype (fp64 stays fp64; else fp32 params; the Triton
    kernels read bf16 / fp16 features as they are, the CPU converts them)."""
    cdt = torch.float64 if feats.dtype == torch.float64 else torch.float32
    f = feats.contiguous() if (triton and feats.dtype != torch.float64) else feats.to(cdt).contiguous()
    return (f, params.detach().to(cdt).contiguous(), im_inds.to(torch.int64).contiguous(),
            locations.detach().to(torch.float32).contiguous(), soi.detach().to(torch.float32).contiguous(), cdt)


@torch.library.custom_op("pyeccv::cond_mask_head_fwd", mutates_args=())
def cond_mask_head_fwd(feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor, soi: Tensor,
                       feat_stride: int, num_layers: int, channels: int, rel_coords: bool, deterministic: bool,
                       backend: str) -> Tensor:
    _check(feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords)
    _check_values(feats, im_inds, soi)
    tri = _use_triton(feats.device, backend)
    f, prm, ii, loc, s, cdt = _prep(feats.detach(), params, im_inds, locations, soi, tri)
    N, C, H, W = feats.shape
    I = prm.shape[0]
    if tri:
        out = _backend.kernels("cond_mask_head").forward(f, prm, ii, loc, s, feat_stride, num_layers, channels,
                                                          rel_coords)
    else:
        out = torch.empty((I, H, W), dtype=cdt, device=feats.device)
        _backend.C().cmh_forward_cpu(**_native_args(f, prm, ii, loc, s, feat_stride, num_layers, channels, rel_coords),
                                     out=out.data_ptr(), num_threads=torch.get_num_threads())
    return out.to(feats.dtype)


@cond_mask_head_fwd.register_fake
def _(feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords, deterministic, backend):
    _check(feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords)
    return feats.new_empty((params.shape[0], feats.shape[2], feats.shape[3]))


@torch.library.custom_op("pyeccv::cond_mask_head_bwd", mutates_args=())
def cond_mask_head_bwd(g: Tensor, feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor, soi: Tensor,
                       feat_stride: int, num_layers: int, channels: int, rel_coords: bool, deterministic: bool,
                       backend: str) -> Tuple[Tensor, Tensor]:
    tri = _use_triton(feats.device, backend)
    f, prm, ii, loc, s, cdt = _prep(feats.detach(), params, im_inds, locations, soi, tri)
    gg = g.detach().to(cdt).contiguous()
    if tri:
        d_feats, d_params = _backend.kernels("cond_mask_head").backward(
            gg, f, prm, ii, loc, s, feat_stride, num_layers, channels, rel_coords, deterministic)
    else:
        d_feats = torch.empty(feats.shape, dtype=cdt, device=feats.device)
        d_params = torch.empty(prm.shape, dtype=cdt, device=feats.device)
        _backend.C().cmh_backward_cpu(**_native_args(f, prm, ii, loc, s, feat_stride, num_layers, channels, rel_coords),
                                      g_out=gg.data_ptr(), d_feats=d_feats.data_ptr(), d_params=d_params.data_ptr(),
                                      num_threads=torch.get_num_threads())
    return d_feats.to(feats.dtype), d_params.to(params.dtype)


@cond_mask_head_bwd.register_fake
def _(g, feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords, deterministic,
      backend):
    return torch.empty_like(feats), torch.empty_like(params)


def _setup(ctx, inputs, output):
    feats, params, im_inds, locations, soi, feat_stride, num_layers, channels, rel_coords, deterministic, backend = inputs
    ctx.save_for_backward(feats, params, im_inds, locations, soi)
    ctx.args = (feat_stride, num_layers, channels, rel_coords, deterministic, backend)


def _backward(ctx, g):
    feats, params, im_inds, locations, soi = ctx.saved_tensors
    d_feats, d_params = cond_mask_head_bwd(g, feats, params, im_inds, locations, soi, *ctx.args)
    return d_feats, d_params, None, None, None, None, None, None, None, None, None


cond_mask_head_fwd.register_autograd(_backward, setup_context=_setup)


def cond_mask_head(mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor, soi: Tensor, *,
                   feat_stride: int = 8, num_layers: int = 3, channels: int = 8, rel_coords: bool = True,
                   deterministic: bool = True, backend: str = "auto") -> Tensor:
    """CondInst's dynamic mask head: (I, H, W) mask logits at feature resolution.

    mask_feats (N, C, H, W); params (I, num_gen_params) from the controller (AdelaiDet's layout:
    all weights, row-major [out][in] layer by layer, then all biases); im_inds (I,) image of each
    instance; locations (I, 2) its (x, y) in image pixels; soi (I,) the size of interest of its FPN
    level. Input channels: the relative coordinates ((x - x_pixel) / soi, (y - y_pixel) / soi, pixel
    centres at feat_stride * index + feat_stride // 2) unless rel_coords=False, then the C features.
    Layers: (C + 2) -> channels -> ... -> 1, ReLU between. Differentiable w.r.t. mask_feats and
    params; deterministic=False lets the GPU backward reduce with atomics.
    backend: "auto" | "native" | "triton" (AdelaiDet's grouped conv2d: pyeccv.reference).
    """
    _backend.check_backend(backend)
    if backend == "reference":
        raise ValueError("backend='reference': use pyeccv.reference.cond_mask_head.cond_mask_head")
    for name, v in (("feat_stride", feat_stride), ("num_layers", num_layers), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    return cond_mask_head_fwd(mask_feats, params, im_inds, locations, soi, feat_stride, num_layers, channels,
                              bool(rel_coords), bool(deterministic), backend)
