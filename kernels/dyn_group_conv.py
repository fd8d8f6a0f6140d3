"""Triton kernels of Dynamic Group Convolution (Su et al., ECCV 2020): the saliency-gated multi-head
convolution computed on the kept channels only, forward and backward.

Semantics (pyeccv.ops.dyn_group_conv, official layers.py): x (B, C, H, W), weight (C_out, C, kh, kw),
saliency s (B, heads, C) >= 0, co = C_out / heads. Per (b, h), with d = C - keep: d = 0 keeps every
channel; else t = the d-th smallest saliency of the row and the kept channels are those with s > t
(ties at t all dropped, so at most keep). Head h convolves the kept channels, scaled by s, with
weight rows [h co, (h + 1) co); output channel j * heads + h is head h's filter j.

Selection (exact, no sort)
--------------------------
Saliencies are >= 0, so their IEEE bits (-0.0 mapped to 0) are order-preserving unsigned keys
(uint32 from float32 / bf16 / fp16, widened exactly; uint64 from float64). t is found by a radix
select from the most significant digit: each step counts, in one pass over the row, the keys below
2^RB candidate prefixes r + j 2^(RB i) and moves r to the largest candidate whose count is < d; at
the end #{key < r} < d <= #{key <= r}, so r is the d-th smallest key exactly, and channel c is kept
iff key_c > r (every tie at t dropped, as the official `mask.le(threshold)`). RB = 4 on the GPU:
8 steps (16 for float64) of a [C, 16] comparison and one block reduction each, O(C) work, instead of
O(C^2) ranks or a bitonic sort. The kept channels are compacted in ascending channel order by an
exclusive cumsum into a list of n_kept <= keep int32 indices; the scale of entry k is s[b, h, list[k]].

Forward: one launch, the selection fused (the issue: these small convs are launch-bound)
--------------------------------------------------------------------------------------
Grid (B * heads, co tiles, output-pixel tiles); the heads of a sample are adjacent programs (they
read the same input tile). Every program selects its (b, h) row and writes the list to its own
row of an int32 scratch (grid x keep; no two programs share a row, so no race), then a CTA barrier
(the list loads use .cg), then an implicit GEMM over the KEPT channels only:
    acc[m, p] += (W_h[m, list[k], tap] * s[list[k]])  ([BLOCK_M, BLOCK_K])  @  x[b, list[k], pix(p, tap)]
with the reduction over n_kept * kh * kw instead of C * kh * kw, as one flat loop over (channel
chunk, tap) - the chunk outer, so a chunk's input rows are reused from L1 over the kh * kw taps -
which the software pipeliner pipelines (the list and scale loads are its indirect loads). The
saliency scale is folded into the gathered weight tile (BLOCK_M x BLOCK_K multiplies a step; the
input tile, BLOCK_K x BLOCK_N, is as large or larger). The weight is permuted on the host to
(heads, kh * kw, C, co) so that a gathered (channel, tap) column is a contiguous co-vector (in the
original layout every element would be its own sector). Padding taps are masked loads (zeros).
The redundant selection (co tiles x pixel tiles programs per row) stays small because C x H x W is
about constant through a ResNet: large C comes with few pixel tiles.

Backward: select, d_x + d_saliency, d_weight (3 launches, plus torch's zero fill, permutes, sums)
-----------------------------------------------------------------------------------------------
* select: a program per (b, h) writes the list and the exclusive prefix counts cnt[b, h, c] =
  #{kept channels < c} (c = 0..C; cnt[C] = n_kept), read by the two kernels after it.
* d_x, d_saliency: the input gradient of head h on its kept channels is a transposed convolution,
  computed col2im-free as an implicit GEMM that gathers, for each input pixel and tap, the output
  pixel reading it (oh = (ih + ph - r dh) / sh when that divides and lands inside):
      dxg[k, p] = sum_{m, tap} W_h[m, list[k], tap] ([BC, BCO]) * g[b, m heads + h, opix(p, tap)]
  A program owns (sample b, a range R of CR input channels, a tile of BP input pixels) and loops over
  the heads; head h's kept channels inside R are a contiguous segment [cnt[c0], cnt[c0 + CR]) of its
  ascending list, so the GEMM rows are compacted. d_x[b, c] = sum_h s dxg_h is accumulated by
  read-modify-write into the program's own region (zero-filled first; a CTA barrier after each
  head, loads with .cg): deterministic (fixed head order), no atomics, no per-head buffer, every
  element written (zeros where no head keeps the channel). Half inputs accumulate in a float32
  workspace that the program converts at its end. d_saliency[b, h, c] = sum_p x dxg (the derivative
  of x * s: the unscaled product): partials per pixel tile (n_tiles, B, heads, C), zeros written
  for the channels not kept (ties at t included), summed by torch in a fixed order.
  Stride > 1 wastes the (sh sw - 1) / (sh sw) of the (tap, pixel) pairs that no output reads
  (masked MMA inputs).
* d_weight: per (b, h) a GEMM over the output pixels on the compacted columns,
      G_tap[m, k] = sum_q g[b, m heads + h, q] ([BMW, BQ]) * x[b, list[k], pix(q, tap)] ([BQ, BCW]),
  grid (B * heads, kept-channel tiles, co tiles x groups of TB = 3 taps (a 3 x 3 kernel's rows)):
  the g tile is loaded once for the group's taps (one accumulator each; 9 spill on sm_90) and their
  shifted input windows overlap in L1, so g and x cross L2 KK / 3 times instead of KK. Each program
  reduces all pixels, then adds s[list[k]] * G with relaxed float32 (float64) atomics into a
  zeroed (heads, KK, C, co) buffer (coalesced along co): one atomic per (b, h, m, kept channel, tap).
  The order of the adds over the batch is not fixed, so d_weight is not bitwise reproducible (d_x
  and d_saliency are). The deterministic alternatives cost more: per-sample partials hold
  B C_out keep kh kw floats (600 MB at B = 256, C = 512, keep = 128) and pulling per (head,
  channel) over the batch wastes C / keep of the MMAs on pruned channels. Pruned columns stay zero.

Precision: tl.dot with float32 accumulation (float64 for float64) on tensor cores. float32 uses
input_precision "tf32x3" (3 TF32 MMAs, ~float32 accuracy: the tests' and the benchmark's 1e-4
float32 gate, which plain TF32 at ~5e-4 misses) unless torch.get_float32_matmul_precision() is
"high" / "medium", which selects plain "tf32" as torch's own matmuls do; float64 and the
interpreter use "ieee"; bf16 / fp16 run natively (the scaled weight tile is rounded to the input
dtype once). Index arithmetic is int32 on the GPU: one sample's C H W and C_out H_out W_out must stay
below 2^31 (batch offsets are int64).

Tiles (GPU, 4 warps; registers a thread from ptxas for sm_90 via Triton 3.9, no spills; see _tiles):
forward BLOCK_M = co rounded to a power of two in [16, 64] x BLOCK_N = 64 output pixels (128 for
narrow co) x BLOCK_K = 32 kept channels a step (16 in float32 / float64): 96-168 registers.
d_x: CR = 128 channels, BC = 32 kept channels (16 in float64) x BP = 64 pixels, BCO = 16-32: 120-218.
d_weight: BMW = co in [16, 64] x BCW = 16 (32 when BMW = 16) x BQ = 32 pixels, 3 taps: 115-187.
select: 38-40. The interpreter uses larger pixel tiles and radix 256 (fewer interpreted ops).
None of this has run on a GPU yet: the timings below are predictions.

Roofline (H100 SXM: 3.35 TB/s HBM, ~5.5 TB/s L2; TF32 ~495 TFLOP/s dense, so ~165 with tf32x3; bf16
~990), the benchmark's cases, float32, 3 x 3, pad 1, 4 heads, C_out = C, gate 0.25:
  forward, B = 64, C = 256, 14 x 14, keep = 64 (co = 64): useful MACs B C_out keep 9 H W = 1.85 G
           (3.7 GFLOP) -> 22 us at the tf32x3 rate (4 us in bf16). DRAM: x 12.8 MB + out 12.8 MB +
           weight 2.4 MB (+ its permuted copy, 4.7 MB) = 33 MB -> 10 us. Grid 256 x 1 x 4 = 1024
           programs of 64 x 64 x (64 kept x 9 taps = 36 steps of 16). Predicted 40-50 us
           (compute-bound at ~50 % of the tf32x3 rate); bf16 ~15 us, where gathers, the selection
           prologue (8 steps of a [256, 16] compare + reduction) and the ~10-20 us host-side Triton
           launch dominate. B = 64, C = 128, 28 x 28, keep = 32: same MACs, 256 x 1 x 7 programs.
           B = 1: 16 programs, launch- and latency-bound (~10-20 us).
  fwd + bwd, B = 64, C = 128, 28 x 28, keep = 32 (co = 32): backward MACs d_x 1.85 G + d_weight
           1.85 G -> 45 us at the tf32x3 rate. DRAM: g 25.7 MB, x read twice (d_saliency, d_weight)
           51 MB, d_x 25.7 MB (its read-modify-write stays in L2), partials and d_weight ~4 MB ->
           ~105 MB -> 31 us. L2: d_weight's 1536 programs each stream g (100 KB) and 16 kept rows
           of x over 3 taps (~55 KB): ~240 MB -> ~45 us, the likely limit of that kernel; d_x ~50
           MB. 2.4 M d_weight atomics (9.4 MB). Predicted backward ~100-130 us (select ~5, d_x
           ~40, d_weight ~45-60, 5 small torch ops); forward + backward ~150-180 us.
"""
import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
# Index arithmetic runs in IDX: int32 on the GPU; int64 under the interpreter, whose overflow
# sanitizer checks every int32 add and multiply (several interpreter ops each, ~2x the test time).
# Device helpers are few and outside loops for the same reason (each interpreted call re-patches
# triton.language).


@triton.jit
def _threshold(srow, C, d, KEY: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr, IDX: tl.constexpr):
    """The d-th smallest key of the row (1 <= d <= C): radix-2^RB select, most significant digit
    first. Keys: the IEEE bits of the saliencies (>= 0; -0.0 -> 0), order-preserving. Invariant:
    #{key < r} < d. Each step counts the keys below the 2^RB candidates r + j 2^(RB i) in one pass
    (chunks of SB channels) and moves r to the largest candidate whose count is still < d."""
    NSTEP: tl.constexpr = KEY.primitive_bitwidth // RB
    FT: tl.constexpr = tl.float64 if KEY == tl.uint64 else tl.float32
    jj = tl.arange(0, 1 << RB).to(KEY)
    r = tl.zeros((1 << RB,), KEY)  # the prefix, replicated over the candidates
    for step in tl.static_range(NSTEP):
        cand = r + (jj << (RB * (NSTEP - 1 - step)))
        cnt = tl.zeros((1 << RB,), IDX)
        for c0 in range(0, C, SB):
            c = c0 + tl.arange(0, SB).to(IDX)
            cm = c < C
            sv = tl.load(srow + c, mask=cm, other=0.0).to(FT)
            key = tl.where(sv == 0, 0, sv.to(KEY, bitcast=True))
            below = (key[:, None] < cand[None, :]) & cm[:, None]
            cnt += tl.sum(below.to(IDX), axis=0)
        digit = tl.sum((cnt < d).to(IDX), axis=0) - 1  # >= 0: cand[0] = r satisfies it
        r = r + (digit.to(KEY) << (RB * (NSTEP - 1 - step)))
    return tl.max(r, axis=0)


@triton.jit
def _select(srow, lst, cnt_row, C, keep, KEY: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr,
            IDX: tl.constexpr, WRITE_CNT: tl.constexpr):
    """Writes the kept channels of a saliency row, ascending, to lst[0:n] (and with WRITE_CNT the
    exclusive prefix counts cnt_row[c] = #{kept channels < c} for c < C); returns n."""
    FT: tl.constexpr = tl.float64 if KEY == tl.uint64 else tl.float32
    d = C - keep
    t = tl.zeros((), KEY)
    if d > 0:  # keep == C: no threshold, every channel (zero saliencies included) is kept
        t = _threshold(srow, C, d, KEY, RB, SB, IDX)
    n = tl.zeros((), IDX)
    for c0 in range(0, C, SB):
        c = c0 + tl.arange(0, SB).to(IDX)
        cm = c < C
        sv = tl.load(srow + c, mask=cm, other=0.0).to(FT)
        key = tl.where(sv == 0, 0, sv.to(KEY, bitcast=True))
        kept = cm & ((key > t) | ((c * 0 + d) == 0))  # (a vector test: the interpreter mis-types bool scalars)
        ki = kept.to(IDX)
        pos = n + tl.cumsum(ki, axis=0) - ki
        tl.store(lst + pos, c.to(tl.int32), mask=kept)
        if WRITE_CNT:
            tl.store(cnt_row + c, pos.to(tl.int32), mask=cm)
        n += tl.sum(ki, axis=0)
    return n


@triton.jit
def _select_kernel(sal, lst, cnt, C, keep, KEY: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr,
                   IDX: tl.constexpr):
    """Backward's selection: one program per (b, h) row; lst (B * heads, C), cnt (B * heads, C + 1)."""
    bh = tl.program_id(0).to(tl.int64)
    cnt_row = cnt + bh * (C + 1)
    n = _select(sal + bh * C, lst + bh * C, cnt_row, C, keep, KEY, RB, SB, IDX, True)
    tl.store(cnt_row + C, n.to(tl.int32))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x, wt, sal, out, scr, C, H, W, HO, WO, CO, HEADS, KW, KK, keep, SH, SW, PH, PW, DH, DW,
                KEY: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr, IDX: tl.constexpr, PREC: tl.constexpr,
                ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Program (b * heads + h, co tile, output-pixel tile): out[b, m heads + h, p] for its tile."""
    bh = tl.program_id(0)
    mt = tl.program_id(1)
    pt = tl.program_id(2)
    b = bh // HEADS
    h = bh % HEADS
    srow = sal + bh.to(tl.int64) * C
    # the (b, h) selection into this program's own scratch row (n <= keep entries), then a CTA barrier
    prog = (bh.to(tl.int64) * tl.num_programs(1) + mt) * tl.num_programs(2) + pt
    lst = scr + prog * keep
    n = _select(srow, lst, lst, C, keep, KEY, RB, SB, IDX, False)
    tl.debug_barrier()

    HWO = HO * WO
    HW = H * W
    p = pt * BLOCK_N + tl.arange(0, BLOCK_N).to(IDX)
    pm = p < HWO
    ih0 = (p // WO) * SH - PH
    iw0 = (p % WO) * SW - PW
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M).to(IDX)
    mm = m < CO
    ak = tl.arange(0, BLOCK_K).to(IDX)
    xb = x + b.to(tl.int64) * C * HW
    wb = wt + h.to(tl.int64) * KK * C * CO  # (heads, KK, C, CO): columns contiguous along co
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for it in range(tl.cdiv(n, BLOCK_K) * KK):  # (kept-channel chunk, tap), the chunk outer
        tap = (it % KK).to(IDX)
        r = tap // KW
        s = tap % KW
        kk = (it // KK).to(IDX) * BLOCK_K + ak
        km = kk < n
        ch = tl.load(lst + kk, mask=km, other=0, cache_modifier=".cg").to(IDX)
        sc = tl.load(srow + ch, mask=km, other=0.0).to(ACC)
        ih = ih0 + r * DH
        iw = iw0 + s * DW
        pv = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(xb + ch[:, None] * HW + (ih * W + iw)[None, :], mask=km[:, None] & pv[None, :], other=0.0)
        wv = tl.load(wb + (tap * C + ch[None, :]) * CO + m[:, None], mask=mm[:, None] & km[None, :], other=0.0)
        wv = (wv.to(ACC) * sc[None, :]).to(xv.dtype)  # the saliency scale, folded into the weights
        acc = tl.dot(wv.to(DOT), xv.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    ob = out + b.to(tl.int64) * CO * HEADS * HWO
    tl.store(ob + (m[:, None] * HEADS + h) * HWO + p[None, :], acc.to(out.dtype.element_ty),
             mask=mm[:, None] & pm[None, :])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dx_kernel(g, x, wt, sal, lst, cnt, dxa, dx, ds_part, B, C, H, W, HO, WO, CO, HEADS, KW, KK,
                   SH, SW, PH, PW, DH, DW, NSPLIT, NPT,
                   IDX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                   HALF: tl.constexpr, CR: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BCO: tl.constexpr):
    """Program (b, channel range [c0, c0 + CR), input-pixel tile t): d_x[b, range, tile] accumulated
    over the heads in dxa (d_x itself, or a float32 workspace for half inputs), d_saliency partial
    ds_part[t, b, h, range]."""
    pid = tl.program_id(0)
    t = pid % NPT
    j = (pid // NPT) % NSPLIT
    b = pid // (NPT * NSPLIT)
    HW = H * W
    HWO = HO * WO
    c0 = j * CR
    cr = c0 + tl.arange(0, CR).to(IDX)
    crm = cr < C
    p = t * BP + tl.arange(0, BP).to(IDX)
    pm = p < HW
    ihp = p // W + PH  # input row + padding: the output row of tap r is (ihp - r DH) / SH
    iwp = p % W + PW
    xb = x + b.to(tl.int64) * C * HW
    gb = g + b.to(tl.int64) * CO * HEADS * HWO
    ab = dxa + b.to(tl.int64) * C * HW
    bco = tl.arange(0, BCO).to(IDX)
    bc = tl.arange(0, BC).to(IDX)
    for cc in range(c0, tl.minimum(c0 + CR, C), BC):  # zero the region (BC rows at a time: few live registers)
        rows = cc + bc
        tl.store(ab + rows[:, None] * HW + p[None, :], tl.zeros((BC, BP), dxa.dtype.element_ty),
                 mask=(rows < C)[:, None] & pm[None, :])
    tl.debug_barrier()
    NMC = tl.cdiv(CO, BCO)
    for h in range(HEADS):
        bh = b.to(tl.int64) * HEADS + h
        crow = cnt + bh * (C + 1)
        dsrow = ds_part + (t * B * HEADS + bh) * C
        # channels of the range not kept by this head: zero d_saliency
        e0 = tl.load(crow + cr, mask=crm, other=0)
        e1 = tl.load(crow + cr + 1, mask=crm, other=0)
        tl.store(dsrow + cr, tl.zeros((CR,), ds_part.dtype.element_ty), mask=crm & (e1 == e0))
        start = tl.load(crow + c0)
        end = tl.load(crow + tl.minimum(c0 + CR, C))
        wb = wt + h * KK * C * CO
        gh = gb + h * HWO
        for k0 in range(start, end, BC):
            kk = k0 + bc
            km = kk < end
            ch = tl.load(lst + bh * C + kk, mask=km, other=0).to(IDX)
            acc = tl.zeros((BC, BP), ACC)
            for it in range(KK * NMC):  # (tap, co chunk)
                tap = (it // NMC).to(IDX)
                mo = (it % NMC).to(IDX) * BCO + bco
                mom = mo < CO
                nh = ihp - (tap // KW) * DH  # the output pixel reading this input pixel: n / S if it divides
                nw = iwp - (tap % KW) * DW
                nhc = tl.maximum(nh, 0)
                nwc = tl.maximum(nw, 0)
                oh = nhc // SH
                ow = nwc // SW
                ok = pm & (nh >= 0) & (oh * SH == nhc) & (oh < HO) & (nw >= 0) & (ow * SW == nwc) & (ow < WO)
                wv = tl.load(wb + (tap * C + ch[:, None]) * CO + mo[None, :], mask=km[:, None] & mom[None, :],
                             other=0.0)
                gv = tl.load(gh + (mo * HEADS * HWO)[:, None] + (oh * WO + ow)[None, :],
                             mask=mom[:, None] & ok[None, :], other=0.0)
                acc = tl.dot(wv.to(DOT), gv.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
            km2 = km[:, None] & pm[None, :]
            rows = ch[:, None] * HW + p[None, :]
            xv = tl.load(xb + rows, mask=km2, other=0.0).to(ACC)
            tl.store(dsrow + ch, tl.sum(xv * acc, axis=1), mask=km)
            sc = tl.load(sal + bh * C + ch, mask=km, other=0.0).to(ACC)
            cur = tl.load(ab + rows, mask=km2, other=0.0, cache_modifier=".cg")
            tl.store(ab + rows, (cur.to(ACC) + sc[:, None] * acc).to(dxa.dtype.element_ty), mask=km2)
        tl.debug_barrier()  # the next head may update the same elements from other threads
    if HALF:  # the float32 region to the output dtype
        for cc in range(c0, tl.minimum(c0 + CR, C), BC):
            rows = cc + bc
            off = rows[:, None] * HW + p[None, :]
            msk = (rows < C)[:, None] & pm[None, :]
            v = tl.load(ab + off, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(dx + b.to(tl.int64) * C * HW + off, v.to(dx.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_dw_kernel(g, x, sal, lst, cnt, dwt, C, H, W, HO, WO, CO, HEADS, KW, KK, SH, SW, PH, PW, DH, DW,
                   IDX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                   TB: tl.constexpr, BMW: tl.constexpr, BCW: tl.constexpr, BQ: tl.constexpr):
    """Program (b * heads + h, kept-channel tile, co tile * tap groups + tap group): for the TB taps
    of its group, s * G over all output pixels (one accumulator a tap: the g tile is loaded once for
    all of them and the shifted input windows overlap in L1), added atomically into dwt
    (heads, KK, C, CO)."""
    bh = tl.program_id(0)
    kt = tl.program_id(1)
    z = tl.program_id(2)
    NTG = tl.cdiv(KK, TB)
    mt = z // NTG
    tap0 = (z % NTG) * TB
    b = bh // HEADS
    h = bh % HEADS
    bh64 = bh.to(tl.int64)
    n = tl.load(cnt + bh64 * (C + 1) + C)
    kk = kt * BCW + tl.arange(0, BCW).to(IDX)
    km = kk < n
    ch = tl.load(lst + bh64 * C + kk, mask=km, other=0).to(IDX)
    m = mt * BMW + tl.arange(0, BMW).to(IDX)
    mm = m < CO
    HW = H * W
    HWO = HO * WO
    xc = x + b.to(tl.int64) * C * HW + (ch * HW)[None, :]  # the kept rows of sample b
    gm = g + b.to(tl.int64) * CO * HEADS * HWO + ((m * HEADS + h) * HWO)[:, None]  # head h's rows
    aq = tl.arange(0, BQ).to(IDX)
    # per tap of the group: the input-row and -column offsets and an accumulator
    drs = ()
    dcs = ()
    accs = ()
    for i in tl.static_range(TB):
        tap = tap0 + i
        drs = drs + (tl.where(tap < KK, (tap // KW) * DH - PH, H),)  # a tap past KK reads no row
        dcs = dcs + ((tap % KW) * DW - PW,)
        accs = accs + (tl.zeros((BMW, BCW), ACC),)
    npix = tl.where(kt * BCW < n, HWO, 0)  # tiles past the kept count do no work
    for q0 in range(0, npix, BQ):
        q = q0 + aq
        qm = q < HWO
        ihs = (q // WO) * SH
        iws = (q % WO) * SW
        gv = tl.load(gm + q[None, :], mask=mm[:, None] & qm[None, :], other=0.0).to(DOT)
        new = ()
        for i in tl.static_range(TB):
            ih = ihs + drs[i]
            iw = iws + dcs[i]
            v = qm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(xc + (ih * W + iw)[:, None], mask=v[:, None] & km[None, :], other=0.0)
            new = new + (tl.dot(gv, xv.to(DOT), accs[i], input_precision=PREC, out_dtype=ACC),)
        accs = new
    sc = tl.load(sal + bh64 * C + ch, mask=km, other=0.0).to(ACC)
    for i in tl.static_range(TB):
        dst = dwt + (((h * KK + tap0 + i) * C).to(tl.int64) + ch[None, :]) * CO + m[:, None]
        ok = km & (kk * 0 + tap0 + i < KK)  # (a vector test: the interpreter mis-types bool scalars)
        tl.atomic_add(dst, accs[i] * sc[None, :], mask=mm[:, None] & ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _meta(x: torch.Tensor, C: int):
    """Compile-time settings shared by the kernels: the selection's key type, radix width and chunk,
    the index type, the dot precision, the accumulator type and the dot operand type (bf16 widened
    to float32 under the interpreter, whose bf16 tl.dot returns garbage in Triton 3.9)."""
    f64 = x.dtype == torch.float64
    on_gpu = x.device.type == "cuda"
    if x.dtype == torch.float32 and on_gpu:
        prec = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        prec = "ieee"  # float64; bf16 / fp16 ignore it; the interpreter computes exactly
    # radix 16 on the GPU (a [SB, 16] comparison a step); 256 under the interpreter (half the steps)
    return dict(KEY=tl.uint64 if f64 else tl.uint32, RB=4 if on_gpu else 8, SB=min(max(_p2(C), 16), 256),
                IDX=tl.int32 if on_gpu else tl.int64,
                PREC=prec, ACC=tl.float64 if f64 else tl.float32,
                DOT=tl.float32 if (x.dtype == torch.bfloat16 and not on_gpu) else _TL[x.dtype])


def _co_block(co: int, cap: int = 64) -> int:
    return min(max(_p2(co), 16), cap)


def _tiles(x: torch.Tensor, co: int, C: int) -> dict:
    """Tile sizes: fwd (BLOCK_M, BLOCK_N, BLOCK_K), dx (CR, BC, BP, BCO), dw (BMW, BCW, BQ). GPU: the
    largest compiled for sm_90 without spills (Triton 3.9's ptxas, 4 warps; registers a thread in the
    comments; float32 runs 3 MMAs a step (tf32x3), whose split operands cost registers). The
    interpreter: big pixel tiles (fewer programs), K steps of 16."""
    bm = _co_block(co)
    if x.device.type != "cuda":
        return dict(fwd=(bm, 128, 16), dx=(min(max(_p2(C), 16), 128), 16, 128, bm), dw=(bm, 16, 128))
    dw = (bm, 32 if bm == 16 else 16, 32)  # 3 taps: 16x32 115-147, 32x16 120-187, 64x16 168-183
    if x.dtype in (torch.bfloat16, torch.float16):
        # fwd 64x64x32: 124, 32x64x32: 119, 16x128x32: 136; dx 32x64 (co 16 / 32): 120 / 127
        return dict(fwd=(bm, 128 if bm == 16 else 64, 32), dx=(128, 32, 64, _co_block(co, 32)), dw=dw)
    if x.dtype == torch.float32:
        # fwd 64x64x16: 126, 32x128x16: 164, 16x128x16: 121; dx 32x64, co 16: 218
        return dict(fwd=(bm, 128 if bm <= 32 else 64, 16), dx=(128, 32, 64, 16), dw=dw)
    # float64: fwd 64x64x16: 151, 32x128x16: 127, 16x128x16: 96; dx 16x64, co 16: 200
    return dict(fwd=(bm, 128 if bm <= 32 else 64, 16), dx=(128, 16, 64, 16), dw=dw)


def _weight_t(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(C_out, C, kh, kw) -> (heads, kh * kw, C, co): a (tap, channel) column of a head contiguous."""
    C_out, C, kh, kw = weight.shape
    return weight.reshape(heads, C_out // heads, C, kh * kw).permute(0, 3, 2, 1).contiguous()


def _geometry(x, weight, saliency, stride, padding, dilation):
    B, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    heads = saliency.shape[1]
    HO = _out_size(H, kh, stride[0], padding[0], dilation[0])
    WO = _out_size(W, kw, stride[1], padding[1], dilation[1])
    return B, C, H, W, C_out, heads, C_out // heads, kh, kw, HO, WO


def forward(x, weight, saliency, keep, stride, padding, dilation):
    """out (B, C_out, H_out, W_out) in x's dtype; inputs contiguous, one dtype, CUDA (or CPU under
    TRITON_INTERPRET=1)."""
    B, C, H, W, C_out, heads, co, kh, kw, HO, WO = _geometry(x, weight, saliency, stride, padding, dilation)
    keep = int(keep)
    out = torch.empty((B, C_out, HO, WO), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bm, bn, bk = _tiles(x, co, C)["fwd"]
    grid = (B * heads, triton.cdiv(co, bm), triton.cdiv(HO * WO, bn))
    scr = torch.empty((grid[0] * grid[1] * grid[2], keep), dtype=torch.int32, device=x.device)  # a list a program
    _fwd_kernel[grid](x, _weight_t(weight, heads), saliency, out, scr, C, H, W, HO, WO, co, heads, kw, kh * kw,
                      keep, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, **_meta(x, C))
    return out


def backward(g, x, weight, saliency, keep, stride, padding, dilation):
    """(d_x, d_weight, d_saliency) in the inputs' dtypes; g (B, C_out, H_out, W_out) contiguous in x's
    dtype. d_x and d_saliency are deterministic; d_weight sums the samples with atomics."""
    B, C, H, W, C_out, heads, co, kh, kw, HO, WO = _geometry(x, weight, saliency, stride, padding, dilation)
    keep = int(keep)
    dev = x.device
    meta = _meta(x, C)
    tiles = _tiles(x, co, C)
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    KK = kh * kw
    geo = (C, H, W, HO, WO, co, heads, kw, KK, stride[0], stride[1], padding[0], padding[1], dilation[0],
           dilation[1])
    dot = dict(IDX=meta["IDX"], PREC=meta["PREC"], ACC=meta["ACC"], DOT=meta["DOT"])
    # selection: compact lists and prefix counts per (b, h)
    lst = torch.empty((B * heads, C), dtype=torch.int32, device=dev)
    cnt = torch.empty((B * heads, C + 1), dtype=torch.int32, device=dev)
    _select_kernel[(B * heads,)](saliency, lst, cnt, C, keep, KEY=meta["KEY"], RB=meta["RB"], SB=meta["SB"],
                                 IDX=meta["IDX"], num_warps=4)
    # d_x and d_saliency
    cr, bc, bp, bco = tiles["dx"]
    nsplit, npt = triton.cdiv(C, cr), triton.cdiv(H * W, bp)
    half = x.dtype not in (torch.float32, torch.float64)
    d_x = torch.empty_like(x)
    dxa = torch.empty(x.shape, dtype=torch.float32, device=dev) if half else d_x
    ds_part = torch.empty((npt, B * heads, C), dtype=acc_dt, device=dev)
    _bwd_dx_kernel[(B * nsplit * npt,)](g, x, _weight_t(weight, heads), saliency, lst, cnt, dxa, d_x, ds_part, B,
                                        *geo, nsplit, npt, HALF=half, CR=cr, BC=bc, BP=bp, BCO=bco, num_warps=4,
                                        num_stages=2, **dot)
    d_s = (ds_part.sum(0) if npt > 1 else ds_part[0]).view(B, heads, C).to(saliency.dtype)
    # d_weight
    bmw, bcw, bq = tiles["dw"]
    tb = min(KK, 3)  # taps a program, one accumulator each (9 spill on sm_90); 3 x 3: the 3 tap rows
    dwt = torch.zeros((heads, KK, C, co), dtype=acc_dt, device=dev)
    grid = (B * heads, triton.cdiv(keep, bcw), triton.cdiv(co, bmw) * triton.cdiv(KK, tb))
    _bwd_dw_kernel[grid](g, x, saliency, lst, cnt, dwt, *geo, TB=tb, BMW=bmw, BCW=bcw, BQ=bq, num_warps=4,
                         num_stages=3, **dot)
    d_w = dwt.permute(0, 3, 2, 1).reshape(C_out, C, kh, kw).to(weight.dtype)
    return d_x, d_w, d_s
