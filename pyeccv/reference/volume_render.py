"""References for NeRF volume rendering (Mildenhall et al., ECCV 2020, arXiv 2003.08934).

- `raw2outputs`: the vanilla NeRF function (bmild/nerf, yenchenlin/nerf-pytorch) on a dense
  (rays, samples) batch: sigmoid colours, densities through relu, the last interval 1e10, weights
  from a cumprod of (1 - alpha + 1e-10).
- `dense_render`: the same compositing on explicit intervals, written the way a dense PyTorch
  user writes it (the benchmark baseline): alpha = 1 - exp(-sigma dt), T = exp(-exclusive cumsum),
  w = T alpha, autograd through it all.
- `packed_render_weights` / `packed_render`: a plain per-ray loop over packed samples (nerfacc's
  layout: packed_info (R, 2) = start, count), both density and alpha inputs, early stopping. The
  oracle of the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def raw2outputs(raw: torch.Tensor, z_vals: torch.Tensor, rays_d: torch.Tensor, raw_noise_std: float = 0.0,
                white_bkgd: bool = False):
    """Vanilla NeRF: raw (R, S, 4) -> rgb_map (R, 3), disp_map, acc_map, weights (R, S), depth_map."""
    dists = z_vals[..., 1:] - z_vals[..., :-1]
    dists = torch.cat([dists, torch.full_like(dists[..., :1], 1e10)], -1)
    dists = dists * torch.norm(rays_d[..., None, :], dim=-1)
    rgb = torch.sigmoid(raw[..., :3])
    noise = torch.randn_like(raw[..., 3]) * raw_noise_std if raw_noise_std > 0 else 0.0
    alpha = 1.0 - torch.exp(-F.relu(raw[..., 3] + noise) * dists)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * trans
    rgb_map = torch.sum(weights[..., None] * rgb, -2)
    depth_map = torch.sum(weights * z_vals, -1)
    acc_map = torch.sum(weights, -1)
    disp_map = 1.0 / torch.max(1e-10 * torch.ones_like(depth_map), depth_map / acc_map)
    if white_bkgd:
        rgb_map = rgb_map + (1.0 - acc_map[..., None])
    return rgb_map, disp_map, acc_map, weights, depth_map


def dense_render(sigmas, rgbs, t_starts, t_ends, background: Optional[torch.Tensor] = None):
    """(R, S) densities, (R, S, 3) colours -> rgb (R, 3), opacity (R,), depth (R,), weights (R, S)."""
    tau = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-tau)
    trans = torch.exp(-(torch.cumsum(tau, -1) - tau))
    weights = trans * alphas
    opacity = weights.sum(-1)
    rgb = (weights[..., None] * rgbs).sum(-2)
    if background is not None:
        rgb = rgb + (1.0 - opacity[..., None]) * background
    depth = (weights * 0.5 * (t_starts + t_ends)).sum(-1)
    return rgb, opacity, depth, weights


def packed_render_weights(values, t_starts, t_ends, packed_info, *, is_alpha: bool = False,
                          early_stop_eps: float = 0.0):
    """Per-ray loop: (weights, transmittance, alphas), each (N,)."""
    w_parts, t_parts, a_parts = [], [], []
    pieces = []
    for start, count in packed_info.tolist():
        if count == 0:
            continue
        v = values[start:start + count]
        if is_alpha:
            alphas = v
            trans = torch.cumprod(torch.cat([v.new_ones(1), 1 - v[:-1]]), 0)
        else:
            tau = v * (t_ends[start:start + count] - t_starts[start:start + count])
            alphas = 1 - torch.exp(-tau)
            trans = torch.exp(-(torch.cumsum(tau, 0) - tau))
        weights = trans * alphas
        if early_stop_eps > 0:
            weights = torch.where(trans >= early_stop_eps, weights, torch.zeros_like(weights))
        pieces.append((start, weights, trans, alphas))
    n = values.shape[0]
    out = [values.new_zeros(n) for _ in range(3)]
    for start, w, t, a in pieces:  # scatter back (rays may come in any order)
        idx = torch.arange(start, start + w.shape[0], device=values.device)
        out = [o.index_put((idx,), x) for o, x in zip(out, (w, t, a))]
    return tuple(out)


def packed_render(values, rgbs, t_starts, t_ends, packed_info, background=None, *, is_alpha: bool = False,
                  early_stop_eps: float = 0.0):
    """Per-ray loop: rgb (R, 3), opacity (R,), depth (R,), weights (N,)."""
    weights, _, _ = packed_render_weights(values, t_starts, t_ends, packed_info, is_alpha=is_alpha,
                                          early_stop_eps=early_stop_eps)
    rgb, opacity, depth = [], [], []
    for r, (start, count) in enumerate(packed_info.tolist()):
        w = weights[start:start + count]
        o = w.sum()
        c = (w[:, None] * rgbs[start:start + count]).sum(0)
        if background is not None:
            bg = background[r] if background.dim() == 2 else background
            c = c + (1 - o) * bg
        rgb.append(c)
        opacity.append(o)
        if t_starts is not None:
            depth.append((w * 0.5 * (t_starts[start:start + count] + t_ends[start:start + count])).sum())
        else:
            depth.append(o * 0)
    R = packed_info.shape[0]
    if R == 0:
        z = values.new_zeros(0)
        return values.new_zeros(0, 3), z, z, weights
    return torch.stack(rgb), torch.stack(opacity), torch.stack(depth), weights


def packed_render_vectorized(sigmas, rgbs, t_starts, t_ends, packed_info, background=None):
    """Packed densities without a Python loop, the way a packed PyTorch user writes it (nerfacc's
    formulation): a global cumsum of tau minus each ray's offset, weights, then index_add_ per ray.
    Rays stored in order (start of ray r+1 >= end of ray r). Returns rgb, opacity, depth, weights."""
    R, N = packed_info.shape[0], sigmas.shape[0]
    start, count = packed_info[:, 0].long(), packed_info[:, 1].long()
    ray = torch.repeat_interleave(torch.arange(R, device=sigmas.device), count)
    first = torch.cumsum(count, 0) - count  # position of each ray's first sample in the taken order
    total = int(count.sum()) if R else 0
    idx = torch.arange(total, device=sigmas.device) + torch.repeat_interleave(start - first, count)
    if idx.numel() == N and (idx == torch.arange(N, device=sigmas.device)).all():
        idx = None  # the rays cover the samples in order: no gather
    take = (lambda x: x) if idx is None else (lambda x: x[idx])
    tau = take(sigmas) * (take(t_ends) - take(t_starts))
    cs = torch.cumsum(tau.double(), 0)  # global: float32 would lose the late rays' precision
    offset = (cs - tau)[first.clamp_max(max(cs.numel() - 1, 0))] if cs.numel() else cs[:0]
    trans = torch.exp(-(cs - tau - offset[ray])).to(tau.dtype)
    weights = trans * (1 - torch.exp(-tau))
    opacity = torch.zeros(R, dtype=sigmas.dtype, device=sigmas.device).index_add_(0, ray, weights)
    rgb = torch.zeros(R, 3, dtype=rgbs.dtype, device=sigmas.device).index_add_(0, ray, weights[:, None] * take(rgbs))
    depth = torch.zeros(R, dtype=sigmas.dtype, device=sigmas.device).index_add_(
        0, ray, weights * 0.5 * (take(t_starts) + take(t_ends)))
    if background is not None:
        rgb = rgb + (1 - opacity[:, None]) * background
    full = weights if idx is None else torch.zeros(N, dtype=weights.dtype, device=weights.device).index_put((idx,), weights)
    return rgb, opacity, depth, full
