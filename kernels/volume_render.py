"""Triton kernels of the volume-rendering core: packed-ray compositing, forward and backward.

Design (tiled, coalesced). Rays are sorted by sample count (longest first) and a program owns RAYS
consecutive rays of that order, so its rays have similar lengths. It walks them in chunks of
BLOCK_S samples: the tile [RAYS, BLOCK_S] holds, per row, BLOCK_S consecutive samples of one ray,
so a warp reads 32 consecutive floats of a ray (128 B) per load: coalesced, unlike a lane per ray.
The loop runs to the longest ray of the program; shorter rays are masked (no memory traffic).
Along a ray, the serial dependence is resolved per chunk by scans along axis 1, with per-ray
scalars carried from chunk to chunk:
- density: exclusive and inclusive sums of tau = sigma dt (a scan of (sum, sum but the last), so
  no "inclusive - tau" cancellation), T_i = exp(-(carry + exclusive)), T_{i+1} likewise;
- alphas: the exclusive product of 1 - alpha (a scan of (product, product but the last));
- backward: the affine recurrence V_{i-1} = b_i + (1 - alpha_i) V_i (V: the weighted suffix sums
  relative to T_{i+1}, V_{last} = 0), walked from the ray's end: the chunk is loaded in reversed
  order (still coalesced) and scanned forwards with the composition of affine maps, again as
  (all, all but the last) so that the scan gives the exclusive value; no division, exact where
  alpha = 1 and sigma = 0. d tau_i = T_{i+1} (g_i - V_i) = T_{i+1} g_i - sum_{j>i} g_j w_j (the
  suffix sum accumulated from the ray's end), d alpha_i = T_i (g_i - V_i).
The backward stores nothing per sample in the forward: pass 1 (from the ray's end) reads sigma,
dt, rgb (and g_weights), computes g_i = dL/dw_i and V_i, and parks g_i - V_i in d_values; pass 2
(from the start) re-reads sigma and dt (mostly L2 hits: the same program read them shortly before) and
the parked value, recomputes T, and writes d_values and d_rgbs (w_i g_rgb). The early stop (the
first sample with T < eps, recorded per ray as n_active by the forward) bounds both passes.

Tile: RAYS = 8 rays x BLOCK_S = 32 samples, 4 warps: a row is one warp-wide run of 32 samples,
so every scan and reduction along a ray stays inside a warp (shuffles, no shared memory or
barrier in the loops); 32-bit sample indices (unless 3 N >= 2^31). sm_90 (ptxas via Triton 3.9):
56 (forward) / 48 (backward) registers, 1 KB shared. PYECCV_VR_TILE="RAYS,BLOCK_S,WARPS" overrides
the tile for tuning on a device (powers of two).

Roofline (H100 SXM, ~3.0 TB/s copy bandwidth), float32, 65536 rays x 192 samples (12.58 M samples).
Bytes per sample: forward reads sigma, t_start, t_end, rgb: 24 B. Backward: torch.zeros of
d_sigma, d_rgb (16 B written; kept for samples of no ray), pass 1 reads 24 B and parks 4 B,
pass 2 re-reads sigma, dt and the parked value (16 B; L2 hits while the program's rays stay in
the 50 MB L2) and writes d_sigma + d_rgb (16 B, the parked line written back once). DRAM: 80 B/sample
(96 B if pass 2 misses L2; the 64 B floor without the zero fill) = 1.01 GB -> 0.34 ms at 3 TB/s,
~0.42 ms at 80 % of copy bandwidth, plus two argsorts of the 65536 counts and ~6 small launches
(~20-40 us): ~0.45 ms for forward + backward. Compute: ~4 exp a sample and per 32-sample row a few
warp scans (5 shuffle steps on 2-4 values): ~55 warp shuffles per 32 samples over forward and
backward, ~0.1 ms of SM shuffle throughput on 132 SMs, overlapped: memory bound.
"""
import os
import struct

import torch
import triton
import triton.language as tl

_RAYS = 8  # rays per program (rows of the tile)
_BLOCK_S = 32  # samples per chunk (columns: one warp-wide row; a power of two for the scans)
_WARPS = 4
if os.environ.get("PYECCV_VR_TILE"):  # tuning on a device: "RAYS,BLOCK_S,WARPS"
    _RAYS, _BLOCK_S, _WARPS = (int(x) for x in os.environ["PYECCV_VR_TILE"].split(","))
    if any(x < 1 or x & (x - 1) for x in (_RAYS, _BLOCK_S, _WARPS)):
        raise ValueError(f"PYECCV_VR_TILE: powers of two expected, got {os.environ['PYECCV_VR_TILE']!r}")


# ---- scan combine functions: (all, all but the last) pairs give exclusive scans --------------------
@triton.jit
def _sum_excl(s1, e1, s2, e2):
    return s1 + s2, s1 + e2


@triton.jit
def _prod_excl(p1, e1, p2, e2):
    return p1 * p2, p1 * e2


@triton.jit
def _affine_excl(m1, c1, n1, d1, m2, c2, n2, d2):
    """Maps V -> c + m V, left applied first: (m, c) of all, (n, d) of all but the last."""
    return m1 * m2, c1 * m2 + c2, m1 * n2, c1 * n2 + d2


@triton.jit
def _last(x, lane, BLOCK_S: tl.constexpr):
    """x[:, BLOCK_S - 1] (a select and a sum of zeros: exact)."""
    return tl.sum(tl.where(lane == BLOCK_S - 1, x, 0.0), axis=1)


@triton.jit
def _rays(order, pi, R, RAYS: tl.constexpr, IDX64: tl.constexpr):
    """The program's rays: ids, row mask, start, count (0 for rows past R); sample indices in
    int32 unless IDX64 (3 N >= 2^31)."""
    rows = tl.program_id(0) * RAYS + tl.arange(0, RAYS)
    rm = rows < R
    r = tl.load(order + rows, mask=rm, other=0)
    start = tl.load(pi + 2 * r, mask=rm, other=0)
    cnt = tl.load(pi + 2 * r + 1, mask=rm, other=0)
    if not IDX64:
        start = start.to(tl.int32)
        cnt = cnt.to(tl.int32)
    return r, rm, start, cnt


@triton.jit
def _load_vt(v, ts, te, idx, m, IS_ALPHA: tl.constexpr, HAS_T: tl.constexpr, CDT: tl.constexpr):
    """values and (t_start, t_end) (zeros without intervals) of a tile; masked lanes 0."""
    val = tl.load(v + idx, mask=m, other=0.0).to(CDT)
    if HAS_T or not IS_ALPHA:
        t0 = tl.load(ts + idx, mask=m, other=0.0).to(CDT)
        t1 = tl.load(te + idx, mask=m, other=0.0).to(CDT)
    else:
        t0 = tl.zeros_like(val)
        t1 = tl.zeros_like(val)
    return val, t0, t1


@triton.jit
def _trans(val, t0, t1, carry, lane, IS_ALPHA: tl.constexpr, BLOCK_S: tl.constexpr):
    """One chunk along the rays (masked lanes: val = 0, an identity): alpha_i, T_i, T_{i+1}, dt_i,
    exp(-tau_i) = 1 - alpha_i, and the carry to the next chunk (density: the running sum of tau;
    alphas: the running transmittance)."""
    zero = tl.zeros_like(val)
    if IS_ALPHA:
        a = val
        e = 1.0 - val
        p, ex = tl.associative_scan((e, zero + 1.0), 1, _prod_excl)
        T = carry[:, None] * ex
        T1 = carry[:, None] * p
        new_carry = _last(T1, lane, BLOCK_S)
        dt = zero
    else:
        dt = t1 - t0
        tau = val * dt
        s, ex = tl.associative_scan((tau, zero), 1, _sum_excl)
        sin = carry[:, None] + s
        T = tl.exp(-(carry[:, None] + ex))
        T1 = tl.exp(-sin)
        e = tl.exp(-tau)
        a = 1.0 - e
        new_carry = _last(sin, lane, BLOCK_S)
    return a, T, T1, dt, e, new_carry


@triton.jit
def _forward_kernel(order, pi, v, c, ts, te, bg, rgb, opacity, depth, w_out, t_out, a_out, n_act, R,
                    eps0, eps1, eps2,
                    MODE: tl.constexpr, IS_ALPHA: tl.constexpr, HAS_T: tl.constexpr, HAS_BG: tl.constexpr,
                    BG_PER_RAY: tl.constexpr, WRITE_W: tl.constexpr, STOP: tl.constexpr, CDT: tl.constexpr,
                    IDX64: tl.constexpr, RAYS: tl.constexpr, BLOCK_S: tl.constexpr):
    """MODE 0: compositing (rgb, opacity, depth, n_active, weights if WRITE_W); 1: weights,
    transmittance, alphas of every sample; 2: n_active only."""
    r, rm, start, cnt = _rays(order, pi, R, RAYS, IDX64)
    lane = tl.arange(0, BLOCK_S)[None, :]
    zr = tl.zeros((RAYS,), CDT)
    eps = zr + eps0  # float scalars arrive as float32: float64 gets eps exactly from three parts
    if CDT == tl.float64:
        eps = eps + eps1 + eps2
    if IS_ALPHA:
        carry = zr + 1.0
    else:
        carry = zr
    zt = tl.zeros((RAYS, BLOCK_S), CDT)  # per-lane partial sums, reduced once at the end
    acc_r = zt
    acc_g = zt
    acc_b = zt
    acc_o = zt
    acc_d = zt
    nact = cnt
    nchunks = (tl.max(cnt, 0) + BLOCK_S - 1) // BLOCK_S
    for k in range(0, nchunks):
        i = k * BLOCK_S + lane
        valid = i < cnt[:, None]
        idx = start[:, None] + i
        if STOP and MODE != 1:
            lm = i < nact[:, None]  # nothing is read past a ray's stop
        else:
            lm = valid
        val, t0, t1 = _load_vt(v, ts, te, idx, lm, IS_ALPHA, HAS_T, CDT)
        a, T, T1, dt, e, carry = _trans(val, t0, t1, carry, lane, IS_ALPHA, BLOCK_S)
        if STOP:
            bad = lm & ~(T >= eps[:, None])  # (NaN stops too, as on the CPU)
            first = tl.min(tl.where(bad, i, cnt[:, None]), axis=1)
            nact = tl.minimum(nact, first)
            act = lm & (i < nact[:, None])
        else:
            act = valid
        w = tl.where(act, T * a, 0.0)
        if MODE == 0:
            acc_o += w
            acc_r += w * tl.load(c + 3 * idx, mask=act, other=0.0).to(CDT)
            acc_g += w * tl.load(c + 3 * idx + 1, mask=act, other=0.0).to(CDT)
            acc_b += w * tl.load(c + 3 * idx + 2, mask=act, other=0.0).to(CDT)
            if HAS_T:
                acc_d += w * (t0 + t1)
            if WRITE_W:
                tl.store(w_out + idx, w.to(w_out.dtype.element_ty), mask=valid)
        if MODE == 1:
            tl.store(w_out + idx, w.to(w_out.dtype.element_ty), mask=valid)
            tl.store(t_out + idx, T.to(t_out.dtype.element_ty), mask=valid)
            tl.store(a_out + idx, a.to(a_out.dtype.element_ty), mask=valid)
    if MODE == 0:
        o = tl.sum(acc_o, axis=1)
        cr = tl.sum(acc_r, axis=1)
        cg = tl.sum(acc_g, axis=1)
        cb = tl.sum(acc_b, axis=1)
        if HAS_BG:
            boff = 3 * r if BG_PER_RAY else r * 0
            f = 1.0 - o
            cr += f * tl.load(bg + boff, mask=rm, other=0.0).to(CDT)
            cg += f * tl.load(bg + boff + 1, mask=rm, other=0.0).to(CDT)
            cb += f * tl.load(bg + boff + 2, mask=rm, other=0.0).to(CDT)
        tl.store(rgb + 3 * r, cr.to(rgb.dtype.element_ty), mask=rm)
        tl.store(rgb + 3 * r + 1, cg.to(rgb.dtype.element_ty), mask=rm)
        tl.store(rgb + 3 * r + 2, cb.to(rgb.dtype.element_ty), mask=rm)
        tl.store(opacity + r, o.to(opacity.dtype.element_ty), mask=rm)
        tl.store(depth + r, (0.5 * tl.sum(acc_d, axis=1)).to(depth.dtype.element_ty), mask=rm)
    if MODE != 1:
        tl.store(n_act + r, nact.to(tl.int32), mask=rm)


@triton.jit
def _backward_kernel(order, pi, v, c, ts, te, bg, n_act, g_rgb, g_op, g_dep, g_w, gt_in, ga_in, d_v, d_c, d_bg, R,
                     MODE: tl.constexpr, IS_ALPHA: tl.constexpr, HAS_T: tl.constexpr, HAS_BG: tl.constexpr,
                     BG_PER_RAY: tl.constexpr, HAS_GW: tl.constexpr, CDT: tl.constexpr, IDX64: tl.constexpr,
                     RAYS: tl.constexpr, BLOCK_S: tl.constexpr):
    """MODE 0: compositing, upstream g_rgb, g_opacity, g_depth (HAS_T), g_weights (HAS_GW) -> d_values,
    d_rgbs, per-ray d_background; MODE 1: render_weights, upstream g_w, gt_in, ga_in -> d_values."""
    r, rm, start, cnt = _rays(order, pi, R, RAYS, IDX64)
    nact = tl.load(n_act + r, mask=rm, other=0).to(cnt.dtype)
    lane = tl.arange(0, BLOCK_S)[None, :]
    zr = tl.zeros((RAYS,), CDT)
    if MODE == 0:
        gr = tl.load(g_rgb + 3 * r, mask=rm, other=0.0).to(CDT)
        gg = tl.load(g_rgb + 3 * r + 1, mask=rm, other=0.0).to(CDT)
        gb = tl.load(g_rgb + 3 * r + 2, mask=rm, other=0.0).to(CDT)
        # dL/dw_i = g_rgb . (c_i - bg) + g_opacity + g_depth t_mid_i (+ g_weights_i)
        g0 = tl.load(g_op + r, mask=rm, other=0.0).to(CDT)
        if HAS_BG:
            boff = 3 * r if BG_PER_RAY else r * 0
            g0 -= gr * tl.load(bg + boff, mask=rm, other=0.0).to(CDT)
            g0 -= gg * tl.load(bg + boff + 1, mask=rm, other=0.0).to(CDT)
            g0 -= gb * tl.load(bg + boff + 2, mask=rm, other=0.0).to(CDT)
        if HAS_T:
            hd = 0.5 * tl.load(g_dep + r, mask=rm, other=0.0).to(CDT)
        else:
            hd = zr
        L = nact  # samples past the stop have w = 0 and get zero gradients
    else:
        L = cnt  # the transmittance of every sample has an upstream gradient
    # pass 1, from each ray's end (lane p = sample L - 1 - k BLOCK_S - p): V, parked as g - V
    vc = zr
    n1 = (tl.max(L, 0) + BLOCK_S - 1) // BLOCK_S
    for k in range(0, n1):
        i = L[:, None] - 1 - (k * BLOCK_S + lane)
        m = i >= 0
        idx = start[:, None] + i
        val, t0, t1 = _load_vt(v, ts, te, idx, m, IS_ALPHA, HAS_T, CDT)
        if IS_ALPHA:
            a = val
            e = 1.0 - val
        else:
            e = tl.exp(-(val * (t1 - t0)))
            a = 1.0 - e
        if MODE == 0:
            g = g0[:, None] + gr[:, None] * tl.load(c + 3 * idx, mask=m, other=0.0).to(CDT)
            g += gg[:, None] * tl.load(c + 3 * idx + 1, mask=m, other=0.0).to(CDT)
            g += gb[:, None] * tl.load(c + 3 * idx + 2, mask=m, other=0.0).to(CDT)
            if HAS_T:
                g += hd[:, None] * (t0 + t1)
            if HAS_GW:
                g += tl.load(g_w + idx, mask=m, other=0.0).to(CDT)
            g = tl.where(m, g, 0.0)
            b = g * a
        else:
            g = tl.load(g_w + idx, mask=m & (i < nact[:, None]), other=0.0).to(CDT)
            b = g * a + tl.load(gt_in + idx, mask=m, other=0.0).to(CDT)
        zero = tl.zeros_like(b)
        mm, cc, nn, dd = tl.associative_scan((e, b, zero + 1.0, zero), 1, _affine_excl)
        V = dd + nn * vc[:, None]  # sum_{j>i} b_j prod_{i<l<j} (1 - alpha_l)
        tl.store(d_v + idx, (g - V).to(d_v.dtype.element_ty), mask=m)
        vc = _last(cc + mm * vc[:, None], lane, BLOCK_S)
    # pass 2, from each ray's start: T again, and the gradients (every sample of the ray written).
    # Its threads read values parked by other threads of the program (other lanes, reversed
    # order): a CTA barrier orders pass 1's stores before pass 2's loads on a GPU.
    tl.debug_barrier()
    if IS_ALPHA:
        carry = zr + 1.0
    else:
        carry = zr
    acc_o = tl.zeros((RAYS, BLOCK_S), CDT)
    n2 = (tl.max(cnt, 0) + BLOCK_S - 1) // BLOCK_S
    for k in range(0, n2):
        i = k * BLOCK_S + lane
        valid = i < cnt[:, None]
        lm = i < L[:, None]
        idx = start[:, None] + i
        val, t0, t1 = _load_vt(v, ts, te, idx, lm, IS_ALPHA, False, CDT)
        a, T, T1, dt, e, carry = _trans(val, t0, t1, carry, lane, IS_ALPHA, BLOCK_S)
        u = tl.load(d_v + idx, mask=lm, other=0.0).to(CDT)
        if IS_ALPHA:
            d = T * u
            if MODE == 1:
                d += tl.load(ga_in + idx, mask=lm, other=0.0).to(CDT)
        else:
            d = T1 * u
            if MODE == 1:
                d += tl.load(ga_in + idx, mask=lm, other=0.0).to(CDT) * e
            d = d * dt
        d = tl.where(lm, d, 0.0)
        tl.store(d_v + idx, d.to(d_v.dtype.element_ty), mask=valid)
        if MODE == 0:
            w = tl.where(lm, T * a, 0.0)
            acc_o += w
            tl.store(d_c + 3 * idx, (w * gr[:, None]).to(d_c.dtype.element_ty), mask=valid)
            tl.store(d_c + 3 * idx + 1, (w * gg[:, None]).to(d_c.dtype.element_ty), mask=valid)
            tl.store(d_c + 3 * idx + 2, (w * gb[:, None]).to(d_c.dtype.element_ty), mask=valid)
    if MODE == 0 and HAS_BG:  # per ray (summed by the caller when the background is shared)
        f = 1.0 - tl.sum(acc_o, axis=1)
        tl.store(d_bg + 3 * r, (f * gr).to(d_bg.dtype.element_ty), mask=rm)
        tl.store(d_bg + 3 * r + 1, (f * gg).to(d_bg.dtype.element_ty), mask=rm)
        tl.store(d_bg + 3 * r + 2, (f * gb).to(d_bg.dtype.element_ty), mask=rm)


def _setup(v, pi):
    """Rays sorted by sample count (longest first), the compute dtype, the grid."""
    R = pi.shape[0]
    order = torch.argsort(pi[:, 1].to(torch.int32), descending=True)
    cdt = tl.float64 if v.dtype == torch.float64 else tl.float32
    return order, R, cdt, (triton.cdiv(max(R, 1), _RAYS),), 3 * v.shape[0] >= 2 ** 31


def _eps3(eps):
    """eps as three float32 parts whose float64 sum is eps (kernel scalars are float32)."""
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    e0 = f32(float(eps))
    e1 = f32(float(eps) - e0)
    return e0, e1, f32(float(eps) - e0 - e1)


def _dummy(x, like):
    return x if x is not None else like.new_zeros(1)


def _forward(v, c, ts, te, pi, bg, eps, is_alpha, mode, w=None, t=None, a=None, rgb=None, opacity=None,
             depth=None, setup=None):
    order, R, cdt, grid, idx64 = setup if setup is not None else _setup(v, pi)
    n_act = torch.empty((R,), dtype=torch.int32, device=v.device)
    if R:
        _forward_kernel[grid](order, pi, v, _dummy(c, v), _dummy(ts, v), _dummy(te, v), _dummy(bg, v),
                              _dummy(rgb, v), _dummy(opacity, v), _dummy(depth, v), _dummy(w, v), _dummy(t, v),
                              _dummy(a, v), n_act, R, *_eps3(eps),
                              MODE=mode, IS_ALPHA=bool(is_alpha), HAS_T=ts is not None, HAS_BG=bg is not None,
                              BG_PER_RAY=bg is not None and bg.dim() == 2, WRITE_W=w is not None,
                              STOP=float(eps) > 0, CDT=cdt, IDX64=idx64, RAYS=_RAYS, BLOCK_S=_BLOCK_S,
                              num_warps=_WARPS)
    return n_act


def forward(v, c, ts, te, pi, bg, eps, is_alpha, return_weights):
    R, N = pi.shape[0], v.shape[0]
    dt, dev = v.dtype, v.device
    rgb = torch.empty((R, 3), dtype=dt, device=dev)
    opacity = torch.empty((R,), dtype=dt, device=dev)
    depth = torch.empty((R,), dtype=dt, device=dev)
    weights = torch.zeros((N if return_weights else 0,), dtype=dt, device=dev)  # samples of no ray: 0
    n_act = _forward(v, c, ts, te, pi, bg, eps, is_alpha, 0, w=weights if return_weights else None, rgb=rgb,
                     opacity=opacity, depth=depth)
    return rgb, opacity, depth, weights, n_act


def backward(gr, go, gd, gw, v, c, ts, te, pi, bg, n_act, eps, is_alpha):
    order, R, cdt, grid, idx64 = _setup(v, pi)
    N = v.shape[0]
    dv = torch.zeros((N,), dtype=v.dtype, device=v.device)  # samples of no ray: 0
    dc = torch.zeros((N, 3), dtype=v.dtype, device=v.device)
    dbg_rays = torch.empty((R, 3), dtype=v.dtype, device=v.device) if bg is not None else None
    if R:
        _backward_kernel[grid](order, pi, v, c, _dummy(ts, v), _dummy(te, v), _dummy(bg, v), n_act, gr, go,
                               _dummy(gd, v), _dummy(gw, v), v, v, dv, dc, _dummy(dbg_rays, v), R,
                               MODE=0, IS_ALPHA=bool(is_alpha), HAS_T=ts is not None and gd is not None,
                               HAS_BG=bg is not None, BG_PER_RAY=bg is not None and bg.dim() == 2,
                               HAS_GW=gw is not None, CDT=cdt, IDX64=idx64, RAYS=_RAYS, BLOCK_S=_BLOCK_S,
                               num_warps=_WARPS)
    if bg is None:
        dbg = torch.empty((0,), dtype=v.dtype, device=v.device)
    elif bg.dim() == 2:
        dbg = dbg_rays
    else:
        dbg = dbg_rays.sum(0) if R else torch.zeros(3, dtype=v.dtype, device=v.device)
    return dv, dc, dbg


def weights(v, ts, te, pi, eps, is_alpha):
    w, t, a = (torch.zeros_like(v) for _ in range(3))  # samples of no ray: 0
    _forward(v, None, ts, te, pi, None, eps, is_alpha, 1, w=w, t=t, a=a)
    return w, t, a


def weights_backward(gw, gt, ga, v, ts, te, pi, eps, is_alpha):
    setup = _setup(v, pi)
    order, R, cdt, grid, idx64 = setup
    dv = torch.zeros_like(v)  # samples of no ray: 0
    if R:
        if float(eps) > 0:  # where each ray stopped, as the forward found it
            n_act = _forward(v, None, ts, te, pi, None, eps, is_alpha, 2, setup=setup)
        else:
            n_act = pi[:, 1].to(torch.int32)
        _backward_kernel[grid](order, pi, v, v, _dummy(ts, v), _dummy(te, v), v, n_act, v, v, v, gw, gt, ga,
                               dv, v, v, R, MODE=1, IS_ALPHA=bool(is_alpha), HAS_T=False, HAS_BG=False,
                               BG_PER_RAY=False, HAS_GW=False, CDT=cdt, IDX64=idx64, RAYS=_RAYS, BLOCK_S=_BLOCK_S,
                               num_warps=_WARPS)
    return dv
