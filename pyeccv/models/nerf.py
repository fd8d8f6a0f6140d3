"""NeRF: Representing Scenes as Neural Radiance Fields for View Synthesis (Mildenhall et al.,
ECCV 2020, arXiv 2003.08934), rendered through `pyeccv.volume_render`.

Follows the official code (bmild/nerf, yenchenlin/nerf-pytorch): positional encoding with the
identity input and frequencies 2^0 .. 2^(L-1) (no pi, as the code), an MLP of `depth` x `width`
ReLU layers with the input concatenated after layer `skips` (4 in the paper), sigma from a linear
head before the view branch, colour from feature + view encoding -> width/2 -> sigmoid, and
hierarchical sampling: a coarse network on stratified samples, then a fine network on the coarse
samples plus `n_fine` importance samples drawn from the coarse weights (Sec. 5.2, Eq. 5).

One difference, on purpose: samples are composited as intervals. The sorted depths t_1 < ... < t_N
in [near, far] get bins with edges at their midpoints (the first bin starts at near, the last ends
at far) instead of the official "distance to the next sample, 1e10 for the last" (which paints the
last sample across infinity). The same bins are the piecewise-constant pdf that importance sampling
inverts, so the coarse weights and the pdf describe the same intervals.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops.volume_render import volume_render

Bound = Union[float, Tensor]


class PositionalEncoding(nn.Module):
    """gamma(p) = (p, sin(2^0 p), cos(2^0 p), ..., sin(2^(L-1) p), cos(2^(L-1) p)) (Eq. 4, official
    code's frequencies and order); out_dim = in_dim (1 + 2 L)."""

    def __init__(self, num_freqs: int, in_dim: int = 3, include_input: bool = True):
        super().__init__()
        self.num_freqs, self.in_dim, self.include_input = num_freqs, in_dim, include_input
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.in_dim * (int(self.include_input) + 2 * self.num_freqs)

    def forward(self, x: Tensor) -> Tensor:
        xf = (x[..., None, :] * self.freqs.to(x.dtype)[:, None]).flatten(-2)  # (..., L * in_dim), freq-major
        parts = [x] if self.include_input else []
        if self.num_freqs:  # interleave per frequency: sin(f0 x), cos(f0 x), sin(f1 x), ...
            s, c = torch.sin(xf), torch.cos(xf)
            parts.append(torch.stack([s.unflatten(-1, (self.num_freqs, self.in_dim)),
                                      c.unflatten(-1, (self.num_freqs, self.in_dim))], -2).flatten(-3))
        return torch.cat(parts, -1)

    def extra_repr(self) -> str:
        return f"num_freqs={self.num_freqs}, in_dim={self.in_dim}, include_input={self.include_input}"


class NeRFMLP(nn.Module):
    """(encoded position, encoded direction) -> (sigma, rgb): the official NeRF network.

    `depth` layers of `width` ReLU units, the encoded position concatenated to the output of each
    layer index in `skips` (paper: 8 x 256, skip 4; indices past the last hidden layer are
    ignored, so `depth` alone can shrink the paper net); sigma = act(linear(h)) with act relu (paper)
    or softplus; rgb = sigmoid(linear(relu(linear([linear(h), gamma(d)])))) with `view_width`
    units (paper: 128). 595,844 parameters in the paper configuration.
    """

    def __init__(self, pos_dim: int, dir_dim: int, depth: int = 8, width: int = 256, skips: Sequence[int] = (4,),
                 view_width: Optional[int] = None, sigma_activation: str = "relu"):
        super().__init__()
        if sigma_activation not in ("relu", "softplus"):
            raise ValueError(f"sigma_activation must be 'relu' or 'softplus', got {sigma_activation!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.skips = tuple(int(s) for s in skips if 0 <= int(s) < depth - 1)
        view_width = width // 2 if view_width is None else view_width
        self.pts_linears = nn.ModuleList(
            [nn.Linear(pos_dim, width)]
            + [nn.Linear(width + (pos_dim if i - 1 in self.skips else 0), width) for i in range(1, depth)])
        self.sigma_linear = nn.Linear(width, 1)
        self.feature_linear = nn.Linear(width, width)
        self.views_linear = nn.Linear(width + dir_dim, view_width)
        self.rgb_linear = nn.Linear(view_width, 3)
        self.sigma_activation = sigma_activation

    def forward(self, x_enc: Tensor, d_enc: Tensor) -> Tuple[Tensor, Tensor]:
        """x_enc (..., pos_dim), d_enc broadcastable to (..., dir_dim) (e.g. (R, 1, dir_dim) per
        ray for (R, S) samples) -> sigma (...), rgb (..., 3)."""
        h = x_enc
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([x_enc, h], -1)
        raw_sigma = self.sigma_linear(h)[..., 0]
        sigma = F.relu(raw_sigma) if self.sigma_activation == "relu" else F.softplus(raw_sigma)
        # views_linear([feature, d_enc]) with its weight split in two, so a per-ray d_enc is
        # multiplied once per ray and broadcast, not copied to every sample
        feat = self.feature_linear(h)
        w = self.views_linear.weight
        v = F.linear(feat, w[:, :feat.shape[-1]], self.views_linear.bias)
        if d_enc.shape[-1]:
            v = v + F.linear(d_enc, w[:, feat.shape[-1]:])
        return sigma, torch.sigmoid(self.rgb_linear(F.relu(v)))


def sample_pdf(bins: Tensor, weights: Tensor, n_samples: int, det: bool = False,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Inverse-CDF sampling of the piecewise-constant pdf given by `weights` (..., B) on the
    intervals with edges `bins` (..., B + 1): (..., n_samples) depths, sorted when det.

    As the official `sample_pdf`: 1e-5 is added to every weight (no empty pdf, no division by 0),
    u = linspace(0, 1, n) when det (evaluation) else uniform, then linear inversion of the cdf
    inside the bin that holds u. Not differentiable w.r.t. weights (they are detached).
    """
    if bins.shape[-1] != weights.shape[-1] + 1:
        raise ValueError(f"bins must have one more entry than weights on the last dim, got "
                         f"{tuple(bins.shape)} and {tuple(weights.shape)}")
    weights = weights.detach() + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1)  # (..., B + 1), aligned with bins
    shape = (*cdf.shape[:-1], n_samples)
    if det:
        u = torch.linspace(0.0, 1.0, n_samples, dtype=cdf.dtype, device=cdf.device).expand(shape)
    else:
        u = torch.rand(shape, dtype=cdf.dtype, device=cdf.device, generator=generator)
    u = u.contiguous()
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = torch.gather(cdf, -1, below), torch.gather(cdf, -1, above)
    bin_lo, bin_hi = torch.gather(bins, -1, below), torch.gather(bins, -1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    t = ((u - cdf_lo) / denom).clamp(0.0, 1.0)
    return (bin_lo + t * (bin_hi - bin_lo)).detach()


def sample_intervals(z: Tensor, near: Tensor, far: Tensor) -> Tuple[Tensor, Tensor]:
    """Sorted depths z (R, S) in [near, far] -> (t_starts, t_ends) (R, S): bins whose edges are
    the midpoints between neighbours, the first starting at near and the last ending at far."""
    mids = 0.5 * (z[..., 1:] + z[..., :-1])
    return torch.cat([near[..., None], mids], -1), torch.cat([mids, far[..., None]], -1)


class NeRF(nn.Module):
    """NeRF (Mildenhall et al., ECCV 2020, arXiv 2003.08934): coarse + fine networks, hierarchical
    sampling, compositing by `pyeccv.volume_render` (fused, exact gradient).

    The defaults are the paper's: 10 / 4 encoding frequencies, 8 x 256 MLPs with the skip at
    layer 4, 128-unit view branch, 64 coarse + 128 fine samples. `n_fine=0` drops the fine network
    (coarse only). `use_viewdirs=False` feeds no direction (the colour depends on position only).

    render_rays(rays_o, rays_d, near, far, *, perturb, background) returns a dict with rgb_coarse,
    rgb_fine (the coarse colour when n_fine == 0), opacity and depth (of the final pass, depth in
    units of t along rays_d), and opacity_coarse / depth_coarse.
    """

    def __init__(self, depth: int = 8, width: int = 256, skips: Sequence[int] = (4,), pos_freqs: int = 10,
                 dir_freqs: int = 4, view_width: Optional[int] = None, n_coarse: int = 64, n_fine: int = 128,
                 use_viewdirs: bool = True, sigma_activation: str = "relu"):
        super().__init__()
        if n_coarse < 1 or n_fine < 0:
            raise ValueError(f"need n_coarse >= 1 and n_fine >= 0, got {n_coarse} and {n_fine}")
        self.n_coarse, self.n_fine, self.use_viewdirs = n_coarse, n_fine, use_viewdirs
        self.pos_enc = PositionalEncoding(pos_freqs)
        self.dir_enc = PositionalEncoding(dir_freqs) if use_viewdirs else None
        dir_dim = self.dir_enc.out_dim if use_viewdirs else 0
        mlp = dict(depth=depth, width=width, skips=skips, view_width=view_width, sigma_activation=sigma_activation)
        self.coarse = NeRFMLP(self.pos_enc.out_dim, dir_dim, **mlp)
        self.fine = NeRFMLP(self.pos_enc.out_dim, dir_dim, **mlp) if n_fine > 0 else None

    def query(self, mlp: NeRFMLP, pts: Tensor, viewdirs: Tensor) -> Tuple[Tensor, Tensor]:
        """pts (R, S, 3), viewdirs (R, 3) unit -> sigma (R, S), rgb (R, S, 3)."""
        d = self.dir_enc(viewdirs)[:, None, :] if self.dir_enc is not None else pts.new_zeros((1, 1, 0))
        return mlp(self.pos_enc(pts), d)

    def _composite(self, sigma, rgb, z, near, far, scale, background, return_weights):
        t_starts, t_ends = sample_intervals(z, near, far)
        # densities act per unit length of the ray, t per unit of rays_d: scale the intervals by |d|
        out = volume_render(sigma, rgb, t_starts * scale, t_ends * scale, background=background,
                            return_weights=return_weights)
        rgb_map, opacity, depth = out[:3]
        return (rgb_map, opacity, depth / scale[:, 0], t_starts, t_ends) + tuple(out[3:])

    def render_rays(self, rays_o: Tensor, rays_d: Tensor, near: Bound, far: Bound, *, perturb: bool = True,
                    background: Optional[Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """rays_o, rays_d (R, 3); near, far floats or (R,) -> dict of (R, 3) colours, (R,) opacity
        and depth. perturb: stratified coarse samples and random importance samples (training);
        False: bin centres and deterministic inverse-CDF samples (evaluation). background (3,) or
        (R, 3) fills the transmittance left at far (e.g. ones for a white background)."""
        if rays_o.shape != rays_d.shape or rays_o.dim() != 2 or rays_o.shape[-1] != 3:
            raise ValueError(f"rays_o and rays_d must be (R, 3), got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}")
        R, dev, dt = rays_o.shape[0], rays_o.device, rays_o.dtype
        near = torch.as_tensor(near, dtype=dt, device=dev).expand(R)
        far = torch.as_tensor(far, dtype=dt, device=dev).expand(R)
        scale = rays_d.norm(dim=-1, keepdim=True)
        viewdirs = rays_d / scale
        if background is not None:
            background = background.to(device=dev, dtype=dt)

        # coarse: N stratified samples, one per equal bin of [near, far] (Eq. 2)
        edges = torch.linspace(0.0, 1.0, self.n_coarse + 1, dtype=dt, device=dev)
        edges = near[:, None] + (far - near)[:, None] * edges
        if perturb:
            u = torch.rand((R, self.n_coarse), dtype=dt, device=dev, generator=generator)
        else:
            u = torch.full((R, self.n_coarse), 0.5, dtype=dt, device=dev)
        z_c = edges[:, :-1] + (edges[:, 1:] - edges[:, :-1]) * u
        pts = rays_o[:, None, :] + rays_d[:, None, :] * z_c[..., None]
        sigma, rgb = self.query(self.coarse, pts, viewdirs)
        rgb_c, opac_c, depth_c, ts, te, w_c = self._composite(sigma, rgb, z_c, near, far, scale, background, True)
        out = {"rgb_coarse": rgb_c, "opacity_coarse": opac_c, "depth_coarse": depth_c}
        if self.fine is None:
            return {**out, "rgb_fine": rgb_c, "opacity": opac_c, "depth": depth_c}

        # fine: the coarse samples plus n_fine drawn from the coarse weights on the same bins (Eq. 5)
        bins = torch.cat([ts, te[:, -1:]], -1)
        z_f = sample_pdf(bins, w_c, self.n_fine, det=not perturb, generator=generator)
        z_f, _ = torch.sort(torch.cat([z_c.detach(), z_f], -1), -1)
        pts = rays_o[:, None, :] + rays_d[:, None, :] * z_f[..., None]
        sigma, rgb = self.query(self.fine, pts, viewdirs)
        rgb_f, opac_f, depth_f, _, _ = self._composite(sigma, rgb, z_f, near, far, scale, background, False)
        return {**out, "rgb_fine": rgb_f, "opacity": opac_f, "depth": depth_f}

    def forward(self, rays_o: Tensor, rays_d: Tensor, near: Bound, far: Bound, *, perturb: bool = True,
                background: Optional[Tensor] = None) -> Dict[str, Tensor]:
        return self.render_rays(rays_o, rays_d, near, far, perturb=perturb, background=background)
