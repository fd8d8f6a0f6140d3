"""Triton kernels of the CondInst dynamic mask head: the per-instance MLP fused over the mask features.

Semantics (AdelaiDet dynamic_mask_head.py; contract of pyeccv.cond_mask_head): instance i runs a tiny
MLP (L layers: in0 -> CH -> ... -> CH -> 1, ReLU between) with its own params (I, P) on every pixel of
its image's mask features feats[im_inds[i]] (C, H, W); with rel_coords, two more input channels come
first: ((loc_x - x_w) / soi, (loc_y - y_h) / soi), x_w = stride * w + stride // 2, in float32, then
rounded to the feature dtype. Params: all weights (layer 0..L-1, row-major [out][in]), then all biases.

Design
------
Neither the (I, C+2, H, W) input nor any hidden activation reaches global memory: the MLP of one
(instance, pixel tile) runs in registers. Channel counts, depth and dtypes are constexpr; the layer
and channel loops are unrolled (tl.static_range), so no channel count needs padding.

* Forward: a program per (instance, tile of BLOCK_F flattened pixels). It reads the instance's C
  feature rows of its tile once (bf16 / fp16 read natively, up-cast), computes rel_x / rel_y from
  (h, w) = divmod(p, W), and keeps the activations as tuples of per-channel [BLOCK] rows; every output
  channel is a chain of FMAs z_o = b_o + sum_k W[o, k] h_k with scalar (warp-uniform, L1-resident)
  weight loads. Writes (I, H, W) logits.
* Backward: a program per (image, pixel tile, segment of the image's instance list). Instances are
  grouped by image on the device (stable argsort, per-image offsets by searchsorted: no atomics, no
  host synchronisation). The feature tile is loaded once; per instance the forward is recomputed
  keeping every layer's activations (a tuple of tuples), then dz = dh * (h > 0) (ReLU backprop on
  the pre-activation sign), dh = W^T dz as FMA chains, and d_feats = sum over the segment's
  instances of W0[:, feats]^T dz0 accumulates in registers (no atomics; images without instances
  get zeros). The parameter gradients are reductions over the tile's pixels, dW = dz h^T, db = dz 1:
  done as batched FMA dots (tl.dot, input_precision="ieee": exact fp32 / fp64 FMAs) with one batch
  of BLOCK_B / 4 pixels a warp, so the pixel reduction runs in-thread after the operands'
  transposition through shared memory, instead of ~7 warp shuffles a value (the tl.sum formulation:
  ~3x more instructions, shuffle-bound). deterministic=True: per-(instance, tile) rows of an
  (I, n_tiles, P) buffer and, with several segments, per-segment d_feats partials (S, N, C, H, W),
  both summed by torch in a fixed order (bitwise reproducible on a given GPU; S depends on its SM
  count); deterministic=False: relaxed atomic adds into (I, P) and (N, C, H, W).
  Segments (1..8) are chosen so the grid has ~4 waves (a wave is ~3 programs an SM): N * n_tiles
  alone is often a bad fraction of a wave (8 images x 54 tiles = 432 programs on 396 slots).
* dtypes: compute dtype CDT = float64 for float64 features, else float32 (params and g in CDT).

Block sizes (checked by compiling for sm_90 with Triton's ptxas, no spills for C=8, CH=8, L=3):
forward BLOCK_F = 512 pixels, 4 warps (4 pixels a thread, 96 registers); backward BLOCK_B = 256
pixels, 4 warps (2 pixels a thread, 166 registers fp32 / 254 fp64), num_stages=1 (the software
pipeliner would turn the scalar weight loads of the instance loop into cp.async copies and spill).
CH=16 compiles without spills in fp32 (255 registers) and spills in fp64 with C=16.

Roofline (H100 SXM: 132 SMs, ~1.75 GHz sustained, 3.35 TB/s HBM, 67 TFLOP/s FP32 FMA; benchmark
N=8, I=500, H x W = 100 x 136, C=8, CH=8, L=3, P=169; Q = I * H * W = 6.8e6 (instance, pixel) pairs)
  forward:  152 MACs a pair (80 + 64 + 8) -> 2.1 GFLOP -> 31 us at FP32 peak.
            HBM: logits 27.2 MB written, feats 3.5 MB read (each instance re-reads its image's
            features, 500 x 0.44 MB = 218 MB, from L2), params 0.3 MB -> 31 MB -> 9 us.
            Issue: 344 SASS instructions a pair (165 FFMA; scalar weight loads, ReLU selects,
            coordinates) -> 73 M warp-instructions / (132 SMs x 4 a clock) -> 79 us.
            Predicted ~80-100 us (issue-bound).
  backward: ~470 MACs a pair (recompute 152, dh 72, d_feats 64, dW/db 169 + padding of the dots)
            -> 6.4 GFLOP -> 96 us at FP32 peak.
            HBM: g 27.2 MB + feats 3.5 MB read; 54 tiles x 4 segments: d_feats partials 14 MB
            written + read back, d_feats 3.5 MB; d_params partials 500 x 54 x 169 x 4 B = 18 MB
            written + read back -> ~100 MB -> 30 us.
            Issue: ~1300 SASS instructions a pair (472 FFMA, 115 LDS for the dots, 160 weight
            loads) -> 276 M warp-instructions -> 0.30 ms. Predicted ~0.3-0.35 ms, plus a few small
            torch launches (argsort, offsets, the two partial sums).
  fwd + bwd: predicted ~0.4-0.45 ms, against 37 ms for the grouped-conv reference (~85x).
"""
import torch
import triton
import triton.language as tl

BLOCK_F = 512  # pixels a forward program
WARPS_F = 4
BLOCK_B = 256  # pixels a backward program (per instance of its image)
WARPS_B = 4

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _relu(z):
    return tl.where(z < 0, 0.0, z)  # NaN propagates, as torch.relu


@triton.jit
def _pixel_xy(p, W, stride, half):
    """Locations (x_w, y_h) of the flattened pixels p, float32: stride * index + stride // 2."""
    xs = (stride * (p % W) + half).to(tl.float32)
    ys = (stride * (p // W) + half).to(tl.float32)
    return xs, ys


@triton.jit
def _rel_xy(locs, soi, i, xs, ys, FDT: tl.constexpr, CDT: tl.constexpr):
    """Relative coordinates of instance i, computed in float32, cast to the feature dtype."""
    lx = tl.load(locs + 2 * i)
    ly = tl.load(locs + 2 * i + 1)
    s = tl.load(soi + i)
    rx = tl.fdiv(lx - xs, s, ieee_rounding=True)
    ry = tl.fdiv(ly - ys, s, ieee_rounding=True)
    return _to_feature_dtype(rx, FDT).to(CDT), _to_feature_dtype(ry, FDT).to(CDT)


@triton.jit
def _to_feature_dtype(x, FDT: tl.constexpr):
    """float32 x rounded (to nearest even) to the feature dtype. bf16 by bit arithmetic: the same on
    the GPU (cvt.rn) and under the interpreter (whose float32 -> bf16 cast truncates)."""
    if FDT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return ((b >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(FDT)


@triton.jit
def _dense(pp, h, W_OFF: tl.constexpr, B_OFF: tl.constexpr, N_IN: tl.constexpr, N_OUT: tl.constexpr,
           RELU: tl.constexpr, CDT: tl.constexpr):
    """Layer on a tuple of N_IN rows -> tuple of N_OUT rows: z_o = b_o + sum_k W[o, k] h_k, chains of FMAs
    with scalar weights."""
    out = ()
    for o in tl.static_range(N_OUT):
        z = tl.load(pp + B_OFF + o).to(CDT)
        for k in tl.static_range(N_IN):
            z = h[k] * tl.load(pp + W_OFF + o * N_IN + k).to(CDT) + z
        if RELU:
            z = _relu(z)
        out = out + (z,)
    return out


@triton.jit
def _fwd_kernel(feats, params, im_inds, locs, soi, out, HW, W, stride, half, P,
                C: tl.constexpr, CP2: tl.constexpr, CH: tl.constexpr, CHP2: tl.constexpr, NL: tl.constexpr,
                IN0: tl.constexpr, NW: tl.constexpr, REL: tl.constexpr, FDT: tl.constexpr, CDT: tl.constexpr,
                BLOCK: tl.constexpr):
    """Activations as tuples of per-channel [BLOCK] rows, weights as scalars: every layer is a chain
    of FMAs, no padding of the channel counts."""
    i = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pm = p < HW
    img = tl.load(im_inds + i)
    base = feats + img.to(tl.int64) * C * HW + p
    h = ()
    if REL:  # input rows: rel_x, rel_y, then the C feature channels (the params' column order)
        xs, ys = _pixel_xy(p, W, stride, half)
        rx, ry = _rel_xy(locs, soi, i, xs, ys, FDT, CDT)
        h = (rx, ry)
    for c in tl.static_range(C):
        h = h + (tl.load(base + c * HW, mask=pm, other=0.0).to(CDT),)
    pp = params + i.to(tl.int64) * P
    h = _dense(pp, h, 0, NW, IN0, CH, True, CDT)
    for l in tl.static_range(1, NL - 1):
        h = _dense(pp, h, CH * IN0 + (l - 1) * CH * CH, NW + l * CH, CH, CH, True, CDT)
    h = _dense(pp, h, CH * IN0 + (NL - 2) * CH * CH, NW + (NL - 1) * CH, CH, 1, False, CDT)
    tl.store(out + i.to(tl.int64) * HW + p, h[0], mask=pm)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _put(ptr, val, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


@triton.jit
def _pix_dot(a, b, NB: tl.constexpr, CDT: tl.constexpr):
    """sum_p a[m, p] b[n, p] ([M, N]) for a [M, BLOCK], b [N, BLOCK]: a batched FMA dot, one batch of
    BLOCK / NB consecutive pixels a warp (the reduction over a warp's pixels runs in-thread after the
    dot's transposition through shared memory; no shuffles), then a sum over the NB batches."""
    M: tl.constexpr = a.shape[0]
    N: tl.constexpr = b.shape[0]
    KB: tl.constexpr = a.shape[1] // NB
    a3 = tl.permute(tl.reshape(a, (M, NB, KB)), (1, 0, 2))
    b3 = tl.permute(tl.reshape(b, (N, NB, KB)), (1, 2, 0))
    return tl.sum(tl.dot(a3, b3, input_precision="ieee", out_dtype=CDT), 0)


@triton.jit
def _stack(rows, N: tl.constexpr, R: tl.constexpr):
    """[R, BLOCK] tensor of the N [BLOCK] rows of a tuple (rows N..R-1 zero). Selects on row indices
    that are compile-time constants per register: register moves after folding."""
    r = tl.arange(0, R)[:, None]
    x = tl.where(r == 0, rows[0][None, :], 0.0)
    for k in tl.static_range(1, N):
        x = tl.where(r == k, rows[k][None, :], x)
    return x


@triton.jit
def _bwd_kernel(feats, params, order, img_off, locs, soi, g, d_feats, d_params, HW, W, stride, half, P, NT,
                SEGS, seg_stride,
                C: tl.constexpr, CP2: tl.constexpr, CH: tl.constexpr, CHP2: tl.constexpr, NL: tl.constexpr,
                IN0: tl.constexpr, NW: tl.constexpr, REL: tl.constexpr, FDT: tl.constexpr, CDT: tl.constexpr,
                ATOMIC: tl.constexpr, DF_ATOMIC: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Program (image, tile, segment): segment `seg` of the image's instance list (SEGS equal parts).
    d_feats: this program's partial sum goes to d_feats + seg * seg_stride (atomically added when
    DF_ATOMIC); d_params: per (instance, tile) rows of a (I, NT, P) buffer, or atomics into (I, P)."""
    img = tl.program_id(0)
    t = tl.program_id(1)
    seg = tl.program_id(2)
    p = t * BLOCK + tl.arange(0, BLOCK)
    pm = p < HW
    base = feats + img.to(tl.int64) * C * HW + p
    f = ()
    for c in tl.static_range(C):
        f = f + (tl.load(base + c * HW, mask=pm, other=0.0).to(CDT),)
    f2 = _stack(f, C, CP2)  # the feature rows as one [CP2, BLOCK] operand (layer 0's weight gradient)
    xs, ys = _pixel_xy(p, W, stride, half)
    ones1 = tl.full((BLOCK,), 1.0, CDT)
    ones = ones1[None, :]
    o = tl.arange(0, CHP2)
    om = o < CH
    k = tl.arange(0, CP2)
    e = tl.arange(0, 4)  # layer 0's extra columns: 0 = ones (bias), 1 = rel_x, 2 = rel_y
    # where each entry of the per-layer gradient blocks goes in the params layout
    w0_off = o[:, None] * IN0 + (IN0 - C) + k[None, :]
    w0_m = om[:, None] & (k < C)[None, :]
    wh_off = o[:, None] * CH + o[None, :]
    wh_m = om[:, None] & om[None, :]
    ex0_off = tl.where(e == 0, NW, e - 1)[None, :] + tl.where(e == 0, 1, IN0)[None, :] * o[:, None]
    ex0_m = om[:, None] & (e < 3)[None, :]
    WL: tl.constexpr = CH * IN0 + (NL - 2) * CH * CH  # offset of the last layer's weights
    df = ()
    for c in tl.static_range(C):
        df = df + (tl.zeros((BLOCK,), CDT),)
    first = tl.load(img_off + img)
    cnt = tl.load(img_off + img + 1) - first
    for j in range(first + (cnt * seg) // SEGS, first + (cnt * (seg + 1)) // SEGS):
        i = tl.load(order + j)
        pp = params + i * P
        if ATOMIC:
            dp = d_params + i * P
        else:
            dp = d_params + (i * NT + t) * P
        x0 = f
        if REL:
            rx, ry = _rel_xy(locs, soi, i, xs, ys, FDT, CDT)
            x0 = (rx, ry) + f
        gv = tl.load(g + i * HW + p, mask=pm, other=0.0).to(CDT)
        # forward, keeping the activations of every layer (acts[l] = output of layer l)
        h = _dense(pp, x0, 0, NW, IN0, CH, True, CDT)
        acts = (h,)
        for l in tl.static_range(1, NL - 1):
            h = _dense(pp, h, CH * IN0 + (l - 1) * CH * CH, NW + l * CH, CH, CH, True, CDT)
            acts = acts + (h,)
        # last layer (CH -> 1): dz = g
        g2 = gv[None, :]
        _put(dp + WL + o[None, :], _pix_dot(g2, _stack(h, CH, CHP2), NB, CDT), om[None, :], ATOMIC)
        _put(dp + NW + (NL - 1) * CH + tl.zeros((1, 1), tl.int32), _pix_dot(g2, ones, NB, CDT), None, ATOMIC)
        dh = ()
        for kk in tl.static_range(CH):
            dh = dh + (gv * tl.load(pp + WL + kk).to(CDT),)
        # hidden layers, last to first: input acts[l - 1], output acts[l]
        for l in tl.static_range(NL - 2, 0, -1):
            woff = CH * IN0 + (l - 1) * CH * CH
            dz = ()
            for oo in tl.static_range(CH):
                dz = dz + (tl.where(acts[l][oo] > 0, dh[oo], 0.0),)
            dz2 = _stack(dz, CH, CHP2)
            _put(dp + woff + wh_off, _pix_dot(dz2, _stack(acts[l - 1], CH, CHP2), NB, CDT), wh_m, ATOMIC)
            _put(dp + NW + l * CH + o[:, None], _pix_dot(dz2, ones, NB, CDT), om[:, None], ATOMIC)
            dh = ()
            for kk in tl.static_range(CH):
                s = dz[0] * tl.load(pp + woff + kk).to(CDT)
                for oo in tl.static_range(1, CH):
                    s = dz[oo] * tl.load(pp + woff + oo * CH + kk).to(CDT) + s
                dh = dh + (s,)
        # layer 0
        dz = ()
        for oo in tl.static_range(CH):
            dz = dz + (tl.where(acts[0][oo] > 0, dh[oo], 0.0),)
        dz2 = _stack(dz, CH, CHP2)
        _put(dp + w0_off, _pix_dot(dz2, f2, NB, CDT), w0_m, ATOMIC)
        if REL:
            _put(dp + ex0_off, _pix_dot(dz2, _stack((ones1, rx, ry), 3, 4), NB, CDT), ex0_m, ATOMIC)
        else:
            _put(dp + NW + o[:, None], _pix_dot(dz2, ones, NB, CDT), om[:, None], ATOMIC)
        ndf = ()
        for kk in tl.static_range(C):
            s = df[kk]
            for oo in tl.static_range(CH):
                s = dz[oo] * tl.load(pp + oo * IN0 + (IN0 - C) + kk).to(CDT) + s
            ndf = ndf + (s,)
        df = ndf
    dfp = d_feats + seg.to(tl.int64) * seg_stride + img.to(tl.int64) * C * HW + p
    for c in tl.static_range(C):
        _put(dfp + c * HW, df[c], pm, DF_ATOMIC)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _meta(feats, num_layers, channels, rel_coords):
    N, C, H, W = feats.shape
    in0 = C + 2 if rel_coords else C
    nw = channels * in0 + (num_layers - 2) * channels * channels + channels  # number of weights
    cdt = torch.float64 if feats.dtype == torch.float64 else torch.float32
    meta = dict(C=C, CP2=_p2(C), CH=channels, CHP2=_p2(channels), NL=num_layers, IN0=in0, NW=nw,
                REL=bool(rel_coords), FDT=_TL[feats.dtype], CDT=_TL[cdt])
    return N, C, H, W, cdt, meta


def _partial_buffer(shape, dtype, device):
    """Per-program partial sums (every entry is written by the kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _segments(N: int, NT: int, I: int, device: torch.device) -> int:
    """Parts each image's instance list is cut into: enough backward programs for ~4 waves (about 3
    resident programs an SM), at most 8, and no more than the mean number of instances an image."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = -(-12 * sms // max(N * NT, 1))
    return max(1, min(want, 8, I // max(N, 1)))


def forward(feats, params, im_inds, locs, soi, stride, num_layers, channels, rel_coords):
    """(I, H, W) logits in the compute dtype (float64 for float64 features, else float32)."""
    N, C, H, W, cdt, meta = _meta(feats, num_layers, channels, rel_coords)
    I, P = params.shape
    HW = H * W
    out = torch.empty((I, H, W), dtype=cdt, device=feats.device)
    if I == 0 or HW == 0:
        return out
    grid = (I, triton.cdiv(HW, BLOCK_F))
    _fwd_kernel[grid](feats, params, im_inds, locs, soi, out, HW, W, int(stride), int(stride) // 2, P,
                      BLOCK=BLOCK_F, num_warps=WARPS_F, num_stages=1, **meta)
    return out


def backward(g, feats, params, im_inds, locs, soi, stride, num_layers, channels, rel_coords, deterministic):
    """(d_feats (N, C, H, W), d_params (I, P)) in the compute dtype; deterministic: bitwise
    reproducible (no atomics; fixed-order sums over tiles and instance segments)."""
    N, C, H, W, cdt, meta = _meta(feats, num_layers, channels, rel_coords)
    I, P = params.shape
    HW = H * W
    dev = feats.device
    if I == 0 or HW == 0:
        return (torch.zeros((N, C, H, W), dtype=cdt, device=dev), torch.zeros((I, P), dtype=cdt, device=dev))
    # instances grouped by image (stable), per-image offsets: no host synchronisation
    order = torch.argsort(im_inds, stable=True)
    img_off = torch.searchsorted(im_inds[order], torch.arange(N + 1, dtype=im_inds.dtype, device=dev))
    NT = triton.cdiv(HW, BLOCK_B)
    S = _segments(N, NT, I, dev)
    atomic = not deterministic
    if S == 1:
        df_buf = torch.empty((N, C, H, W), dtype=cdt, device=dev)
    elif atomic:
        df_buf = torch.zeros((N, C, H, W), dtype=cdt, device=dev)
    else:
        df_buf = _partial_buffer((S, N, C, H, W), cdt, dev)
    dp_buf = torch.zeros((I, P), dtype=cdt, device=dev) if atomic else _partial_buffer((I, NT, P), cdt, dev)
    _bwd_kernel[(N, NT, S)](feats, params, order, img_off, locs, soi, g, df_buf, dp_buf, HW, W, int(stride),
                            int(stride) // 2, P, NT, S, N * C * HW if (S > 1 and not atomic) else 0,
                            ATOMIC=atomic, DF_ATOMIC=S > 1 and atomic, BLOCK=BLOCK_B, NB=WARPS_B,
                            num_warps=WARPS_B, num_stages=1, **meta)
    d_feats = df_buf.sum(0) if (S > 1 and not atomic) else df_buf
    d_params = dp_buf if atomic else dp_buf.sum(1)
    return d_feats, d_params
