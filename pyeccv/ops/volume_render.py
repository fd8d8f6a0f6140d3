"""NeRF volume rendering (Mildenhall et al., ECCV 2020, arXiv 2003.08934) on packed rays, as torch
custom ops: compositing fused in one pass per ray, and its exact gradient.

Ops (schemas are stable; see tests/ops/test_volume_render.py):
  pyeccv::volume_render_fwd(values, rgbs, t_starts?, t_ends?, packed_info, background?,
      early_stop_eps, is_alpha, return_weights, backend) -> (rgb, opacity, depth, weights, n_active)
  pyeccv::volume_render_bwd(g_rgb, g_opacity, g_depth, g_weights?, values, rgbs, t_starts?,
      t_ends?, packed_info, background?, n_active, early_stop_eps, is_alpha, backend)
      -> (d_values, d_rgbs, d_background)
  pyeccv::render_weights_fwd / render_weights_bwd: weights, transmittance, alphas and back.
values are densities (is_alpha False: alpha = 1 - exp(-sigma dt), T = exp(-exclusive sum)) or
alphas (T = exclusive product of 1 - alpha), as nerfacc's render_weight_from_density / _alpha.
Semantics: csrc/include/pyeccv/volume_render.h. The backward stores nothing per sample: it
recomputes T and runs one reverse and one forward pass per ray (exact at alpha = 1, sigma = 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, _checks

_CODE = {torch.float32: 0, torch.float64: 1}
_IN = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _CODE else torch.float32


def _check_meta(values, rgbs, t_starts, t_ends, packed_info, background, is_alpha) -> None:
    _checks.tensor("sigmas" if not is_alpha else "alphas", values, ndim=1, dtypes=_IN)
    N, dev = values.shape[0], values.device
    name = "alphas" if is_alpha else "sigmas"
    if rgbs is not None:
        _checks.tensor("rgbs", rgbs, shape=(N, 3), dtypes=_IN, device=dev)
    for tname, t in (("t_starts", t_starts), ("t_ends", t_ends)):
        if t is None:
            if not is_alpha:
                raise ValueError(f"{tname} is required with densities (sigmas)")
            continue
        _checks.tensor(tname, t, shape=(N,), dtypes=_IN, device=dev)
    if (t_starts is None) != (t_ends is None):
        raise ValueError("t_starts and t_ends must be given together")
    _checks.tensor("packed_info", packed_info, ndim=2, device=dev)
    if packed_info.shape[1] != 2 or not _checks.is_int(packed_info):
        raise ValueError(f"packed_info must be an integer (rays, 2) tensor of (start, count), got "
                         f"{tuple(packed_info.shape)} {str(packed_info.dtype).replace('torch.', '')}")
    R = packed_info.shape[0]
    if background is not None:
        _checks.tensor("background", background, dtypes=_IN, device=dev)
        if tuple(background.shape) not in ((3,), (R, 3)):
            raise ValueError(f"background must have shape (3,) or ({R}, 3), got {tuple(background.shape)}")
    for other, oname in ((rgbs, "rgbs"), (t_starts, "t_starts"), (t_ends, "t_ends")):
        if other is not None and other.dtype != values.dtype:
            raise ValueError(f"{oname} must have the dtype of {name} ({values.dtype}), got {other.dtype}")


def _check_data(values, packed_info) -> bool:
    """packed_info in range and rays not overlapping: O(R) for rays stored in order (nerfacc's
    layout, the dense form), a sort otherwise; one host read. Returns whether the rays cover every
    sample (then the kernels, which write every sample of every ray, need no zero-filled outputs).
    Negative intervals are checked by the kernels in passing (_check_intervals on the GPU)."""
    N = values.shape[0]
    pi = packed_info.to(torch.int64)
    start, count = pi[:, 0], pi[:, 1]
    if pi.device.type == "cpu" and _backend.has_native():  # one C++ loop, no torch ops on R-sized tensors
        pi = pi.contiguous()
        bad, in_order, covered = _backend.C().vr_check_packed(pi.data_ptr(), pi.shape[0], N)
    else:
        end = start + count
        bad_range = (start < 0) | (count < 0) | (end > N)
        in_order = (start[1:] >= end[:-1]).all() if start.numel() > 1 else torch.ones((), dtype=torch.bool,
                                                                                       device=values.device)
        flags = torch.stack([bad_range.any(), in_order, count.sum() == N]).cpu()
        bad = int(torch.nonzero(bad_range)[0]) if bool(flags[0]) else -1
        in_order, covered = bool(flags[1]), bool(flags[2])
    if bad >= 0:
        raise ValueError(f"packed_info[{bad}] = ({int(start[bad])}, {int(count[bad])}) is out of range for {N} "
                         f"samples")
    if not in_order:
        nz = count > 0
        s, c = start[nz], count[nz]
        order = torch.argsort(s)
        s, c = s[order], c[order]
        if s.numel() > 1 and bool((s[1:] < s[:-1] + c[:-1]).any()):
            raise ValueError("packed_info: rays overlap (each sample must belong to at most one ray)")
    return covered


def _raise_negative(t_starts, t_ends) -> None:
    i = int(torch.nonzero(t_ends < t_starts)[0])
    raise ValueError(f"t_ends < t_starts (a negative interval) at sample {i}: "
                     f"[{float(t_starts[i])}, {float(t_ends[i])}]")


def _check_intervals(t_starts, t_ends) -> None:
    if t_starts is not None and bool((t_ends < t_starts).any()):
        _raise_negative(t_starts, t_ends)


def _covers(packed_info: Tensor, n: int) -> bool:
    """Do the (already validated, non-overlapping) rays cover all n samples? (CPU only: no sync.)"""
    if packed_info.device.type != "cpu":
        return False
    return bool(_backend.C().vr_check_packed(packed_info.data_ptr(), packed_info.shape[0], n)[2])


def _use_triton(device, backend) -> bool:
    return _backend.use_triton(device, backend, "volume rendering")


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _prep(*ts, dtype):
    return [None if t is None else t.detach().to(dtype).contiguous() for t in ts]


def _pi(packed_info: Tensor) -> Tensor:
    return packed_info.to(torch.int64).contiguous()


# ---------------------------------------------------------------------------------------------
# compositing
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pyeccv::volume_render_fwd", mutates_args=())
def volume_render_fwd(values: Tensor, rgbs: Tensor, t_starts: Optional[Tensor], t_ends: Optional[Tensor],
                      packed_info: Tensor, background: Optional[Tensor], early_stop_eps: float, is_alpha: bool,
                      return_weights: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_meta(values, rgbs, t_starts, t_ends, packed_info, background, is_alpha)
    full = _check_data(values, packed_info)
    dt = _work_dtype(values)
    v, c, ts, te, bg = _prep(values, rgbs, t_starts, t_ends, background, dtype=dt)
    pi = _pi(packed_info)
    R, N = pi.shape[0], v.shape[0]
    dev = v.device
    if _use_triton(dev, backend):
        _check_intervals(t_starts, t_ends)
        rgb, opacity, depth, weights, n_active = _backend.kernels("volume_render").forward(
            v, c, ts, te, pi, bg, early_stop_eps, is_alpha, return_weights)
    else:
        if is_alpha:
            _check_intervals(t_starts, t_ends)  # the alpha kernels read the intervals for the depth only
        rgb = torch.empty((R, 3), dtype=dt, device=dev)
        opacity = torch.empty((R,), dtype=dt, device=dev)
        depth = torch.empty((R,), dtype=dt, device=dev)
        nw = N if return_weights else 0
        weights = torch.empty((nw,), dtype=dt, device=dev) if full else torch.zeros((nw,), dtype=dt, device=dev)
        ok = _backend.C().vr_forward_cpu(_CODE[dt], R, N, pi.data_ptr(), v.data_ptr(), _ptr(ts), _ptr(te), is_alpha,
                                    float(early_stop_eps), c.data_ptr(), _ptr(bg), bg is not None and bg.dim() == 2,
                                    rgb.data_ptr(), opacity.data_ptr(), depth.data_ptr(),
                                    weights.data_ptr() if return_weights else 0, torch.get_num_threads())
        if not ok:
            _raise_negative(t_starts, t_ends)
        n_active = torch.zeros((R,), dtype=torch.int32, device=dev)  # unused: the CPU backward recomputes it
    od = values.dtype
    return rgb.to(od), opacity.to(od), depth.to(od), weights.to(od), n_active


@volume_render_fwd.register_fake
def _(values, rgbs, t_starts, t_ends, packed_info, background, early_stop_eps, is_alpha, return_weights, backend):
    _check_meta(values, rgbs, t_starts, t_ends, packed_info, background, is_alpha)
    R, N = packed_info.shape[0], values.shape[0]
    return (values.new_empty((R, 3)), values.new_empty((R,)), values.new_empty((R,)),
            values.new_empty((N if return_weights else 0,)), values.new_empty((R,), dtype=torch.int32))


@torch.library.custom_op("pyeccv::volume_render_bwd", mutates_args=())
def volume_render_bwd(g_rgb: Tensor, g_opacity: Tensor, g_depth: Tensor, g_weights: Optional[Tensor], values: Tensor,
                      rgbs: Tensor, t_starts: Optional[Tensor], t_ends: Optional[Tensor], packed_info: Tensor,
                      background: Optional[Tensor], n_active: Tensor, early_stop_eps: float, is_alpha: bool,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dt = _work_dtype(values)
    v, c, ts, te, bg, gr, go, gd, gw = _prep(values, rgbs, t_starts, t_ends, background, g_rgb, g_opacity, g_depth,
                                             g_weights, dtype=dt)
    if t_starts is None:
        gd = None  # no depth without intervals
    pi = _pi(packed_info)
    R, N = pi.shape[0], v.shape[0]
    dev = v.device
    if _use_triton(dev, backend):
        dv, dc, dbg = _backend.kernels("volume_render").backward(gr, go, gd, gw, v, c, ts, te, pi, bg, n_active,
                                                                 early_stop_eps, is_alpha)
    else:
        new = torch.empty if _covers(pi, N) else torch.zeros  # the kernel writes every sample of every ray
        dv = new((N,), dtype=dt, device=dev)
        dc = new((N, 3), dtype=dt, device=dev)
        dbg = torch.empty_like(bg) if bg is not None else torch.empty((0,), dtype=dt, device=dev)
        _backend.C().vr_backward_cpu(_CODE[dt], R, N, pi.data_ptr(), v.data_ptr(), _ptr(ts), _ptr(te), is_alpha,
                                     float(early_stop_eps), c.data_ptr(), _ptr(bg), bg is not None and bg.dim() == 2,
                                     _ptr(gr), _ptr(go), _ptr(gd), _ptr(gw), dv.data_ptr(), dc.data_ptr(),
                                     _ptr(dbg) if bg is not None else 0, torch.get_num_threads())
    return (dv.to(values.dtype), dc.to(rgbs.dtype),
            dbg.to(background.dtype) if background is not None else dbg)


@volume_render_bwd.register_fake
def _(g_rgb, g_opacity, g_depth, g_weights, values, rgbs, t_starts, t_ends, packed_info, background, n_active,
      early_stop_eps, is_alpha, backend):
    return (torch.empty_like(values), torch.empty_like(rgbs),
            torch.empty_like(background) if background is not None else values.new_empty((0,)))


def _vr_setup(ctx, inputs, output):
    values, rgbs, t_starts, t_ends, packed_info, background, eps, is_alpha, return_weights, backend = inputs
    ctx.mark_non_differentiable(output[4])
    ctx.save_for_backward(values, rgbs, t_starts, t_ends, packed_info, background, output[4])
    ctx.args = (eps, is_alpha, backend)
    ctx.return_weights = return_weights


def _vr_backward(ctx, g_rgb, g_opacity, g_depth, g_weights, g_n):
    values, rgbs, t_starts, t_ends, packed_info, background, n_active = ctx.saved_tensors
    eps, is_alpha, backend = ctx.args
    zero = lambda like, g: g if g is not None else torch.zeros_like(like)  # noqa: E731
    R = packed_info.shape[0]
    g_rgb = zero(values.new_empty((R, 3)), g_rgb)
    g_opacity = zero(values.new_empty((R,)), g_opacity)
    g_depth = zero(values.new_empty((R,)), g_depth)
    gw = g_weights if ctx.return_weights and g_weights is not None and g_weights.numel() else None
    dv, dc, dbg = volume_render_bwd(g_rgb, g_opacity, g_depth, gw, values, rgbs, t_starts, t_ends, packed_info,
                                    background, n_active, eps, is_alpha, backend)
    return dv, dc, None, None, None, (dbg if background is not None else None), None, None, None, None


volume_render_fwd.register_autograd(_vr_backward, setup_context=_vr_setup)


# ---------------------------------------------------------------------------------------------
# weights only
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pyeccv::render_weights_fwd", mutates_args=())
def render_weights_fwd(values: Tensor, t_starts: Optional[Tensor], t_ends: Optional[Tensor], packed_info: Tensor,
                       early_stop_eps: float, is_alpha: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _check_meta(values, None, t_starts, t_ends, packed_info, None, is_alpha)
    full = _check_data(values, packed_info)
    dt = _work_dtype(values)
    v, ts, te = _prep(values, t_starts, t_ends, dtype=dt)
    pi = _pi(packed_info)
    R, N = pi.shape[0], v.shape[0]
    if _use_triton(v.device, backend):
        _check_intervals(t_starts, t_ends)
        w, t, a = _backend.kernels("volume_render").weights(v, ts, te, pi, early_stop_eps, is_alpha)
    else:
        new = torch.empty if full else torch.zeros  # samples of no ray: 0
        w, t, a = (new((N,), dtype=dt, device=v.device) for _ in range(3))
        ok = _backend.C().render_weights_cpu(_CODE[dt], R, N, pi.data_ptr(), v.data_ptr(), _ptr(ts), _ptr(te), is_alpha,
                                        float(early_stop_eps), w.data_ptr(), t.data_ptr(), a.data_ptr(),
                                        torch.get_num_threads())
        if not ok:
            _raise_negative(t_starts, t_ends)
    od = values.dtype
    return w.to(od), t.to(od), a.to(od)


@render_weights_fwd.register_fake
def _(values, t_starts, t_ends, packed_info, early_stop_eps, is_alpha, backend):
    _check_meta(values, None, t_starts, t_ends, packed_info, None, is_alpha)
    return tuple(torch.empty_like(values) for _ in range(3))


@torch.library.custom_op("pyeccv::render_weights_bwd", mutates_args=())
def render_weights_bwd(g_weights: Tensor, g_trans: Tensor, g_alphas: Tensor, values: Tensor,
                       t_starts: Optional[Tensor], t_ends: Optional[Tensor], packed_info: Tensor,
                       early_stop_eps: float, is_alpha: bool, backend: str) -> Tensor:
    dt = _work_dtype(values)
    v, ts, te, gw, gt, ga = _prep(values, t_starts, t_ends, g_weights, g_trans, g_alphas, dtype=dt)
    pi = _pi(packed_info)
    R, N = pi.shape[0], v.shape[0]
    if _use_triton(v.device, backend):
        dv = _backend.kernels("volume_render").weights_backward(gw, gt, ga, v, ts, te, pi, early_stop_eps, is_alpha)
    else:
        dv = (torch.empty if _covers(pi, N) else torch.zeros)((N,), dtype=dt, device=v.device)
        _backend.C().render_weights_backward_cpu(_CODE[dt], R, N, pi.data_ptr(), v.data_ptr(), _ptr(ts), _ptr(te),
                                                 is_alpha, float(early_stop_eps), gw.data_ptr(), gt.data_ptr(),
                                                 ga.data_ptr(), dv.data_ptr(), torch.get_num_threads())
    return dv.to(values.dtype)


@render_weights_bwd.register_fake
def _(g_weights, g_trans, g_alphas, values, t_starts, t_ends, packed_info, early_stop_eps, is_alpha, backend):
    return torch.empty_like(values)


def _rw_setup(ctx, inputs, output):
    values, t_starts, t_ends, packed_info, eps, is_alpha, backend = inputs
    ctx.save_for_backward(values, t_starts, t_ends, packed_info)
    ctx.args = (eps, is_alpha, backend)


def _rw_backward(ctx, gw, gt, ga):
    values, t_starts, t_ends, packed_info = ctx.saved_tensors
    z = lambda g: g if g is not None else torch.zeros_like(values)  # noqa: E731
    dv = render_weights_bwd(z(gw), z(gt), z(ga), values, t_starts, t_ends, packed_info, *ctx.args)
    return dv, None, None, None, None, None, None


render_weights_fwd.register_autograd(_rw_backward, setup_context=_rw_setup)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _packed(values, others, names, packed_info, name):
    """The dense (R, S) form flattened to packed samples; returns (flat values, flat others,
    packed_info, (R, S) or None)."""
    if packed_info is not None:
        return values, others, packed_info, None
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError(f"{name}: give packed_info for packed samples, or a dense (rays, samples) tensor; "
                         f"got shape {tuple(getattr(values, 'shape', ()))} and no packed_info")
    R, S = values.shape
    flat = []
    for o, oname in zip(others, names):
        if o is None:
            flat.append(None)
            continue
        want = (R, S, 3) if oname == "rgbs" else (R, S)
        if not isinstance(o, Tensor) or tuple(o.shape) != want:
            raise ValueError(f"{name}: {oname} must have shape {want} in the dense form (like the values "
                             f"{tuple(values.shape)}), got {tuple(getattr(o, 'shape', ()))}")
        flat.append(o.reshape(R * S, *o.shape[2:]))
    pi = torch.stack([torch.arange(R, device=values.device) * S, torch.full((R,), S, device=values.device)], 1)
    return values.reshape(R * S), flat, pi, (R, S)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < 1.0):
        raise ValueError(f"early_stop_eps must be in [0, 1), got {eps!r}")
    return float(eps)


def volume_render(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Optional[Tensor] = None,
                  *, background: Optional[Tensor] = None, early_stop_eps: float = 0.0, return_weights: bool = False,
                  backend: str = "auto"):
    """Alpha compositing of packed rays, fused: (rgb (R, 3), opacity (R,), depth (R,)[, weights]).

    sigmas, t_starts, t_ends (N,) and rgbs (N, 3) hold all samples of all rays; packed_info (R, 2)
    = (start, count) per ray (nerfacc's layout). Without packed_info the inputs are dense (R, S),
    (R, S, 3). alpha_i = 1 - exp(-sigma_i dt_i), T_i = exp(-sum_{j<i} sigma_j dt_j), w_i = T_i alpha_i;
    rgb = sum w_i c_i + (1 - opacity) background, opacity = sum w_i, depth = sum w_i (t_start +
    t_end) / 2. early_stop_eps > 0 stops a ray once T < eps (forward and backward agree).
    Differentiable w.r.t. sigmas, rgbs and background. backend: "auto" | "native" | "triton".
    """
    return _render(sigmas, rgbs, t_starts, t_ends, packed_info, background, early_stop_eps, return_weights, backend,
                   is_alpha=False)


def volume_render_alpha(alphas: Tensor, rgbs: Tensor, t_starts: Optional[Tensor] = None,
                        t_ends: Optional[Tensor] = None, packed_info: Optional[Tensor] = None, *,
                        background: Optional[Tensor] = None, early_stop_eps: float = 0.0,
                        return_weights: bool = False, backend: str = "auto"):
    """volume_render from per-sample alphas (T_i = prod_{j<i} (1 - alpha_j)); the intervals only
    serve the depth (zero without them). Differentiable w.r.t. alphas, rgbs and background."""
    return _render(alphas, rgbs, t_starts, t_ends, packed_info, background, early_stop_eps, return_weights, backend,
                   is_alpha=True)


def _render(values, rgbs, t_starts, t_ends, packed_info, background, eps, return_weights, backend, is_alpha):
    _backend.check_backend(backend)
    if backend == "reference":
        raise ValueError("backend='reference': use pyeccv.reference.volume_render (dense_render, packed_render)")
    name = "volume_render_alpha" if is_alpha else "volume_render"
    eps = _check_eps(eps)
    v, (c, ts, te), pi, dense = _packed(values, [rgbs, t_starts, t_ends], ["rgbs", "t_starts", "t_ends"], packed_info,
                                        name)
    rgb, opacity, depth, weights, _ = volume_render_fwd(v, c, ts, te, pi, background, eps, is_alpha,
                                                        bool(return_weights), backend)
    if not return_weights:
        return rgb, opacity, depth
    return rgb, opacity, depth, (weights.reshape(dense) if dense else weights)


def render_weights(sigmas: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Optional[Tensor] = None, *,
                   early_stop_eps: float = 0.0, backend: str = "auto"):
    """nerfacc's render_weight_from_density: (weights, transmittance, alphas), each like sigmas.
    Differentiable w.r.t. sigmas (through all three outputs)."""
    _backend.check_backend(backend)
    eps = _check_eps(early_stop_eps)
    v, (ts, te), pi, dense = _packed(sigmas, [t_starts, t_ends], ["t_starts", "t_ends"], packed_info,
                                     "render_weights")
    out = render_weights_fwd(v, ts, te, pi, eps, False, backend)
    return tuple(x.reshape(dense) for x in out) if dense else out


def render_weights_from_alpha(alphas: Tensor, packed_info: Optional[Tensor] = None, *, early_stop_eps: float = 0.0,
                              backend: str = "auto"):
    """nerfacc's render_weight_from_alpha: (weights, transmittance). Differentiable w.r.t. alphas."""
    _backend.check_backend(backend)
    eps = _check_eps(early_stop_eps)
    v, _, pi, dense = _packed(alphas, [], [], packed_info, "render_weights_from_alpha")
    w, t, _ = render_weights_fwd(v, None, None, pi, eps, True, backend)
    return (w.reshape(dense), t.reshape(dense)) if dense else (w, t)
