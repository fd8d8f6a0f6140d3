"""Triton kernels of the Smooth-AP core: per-query ranks, AP and the analytic gradient d ap / d S.

Layout: S is (Q, B) (query rows against all items); the positives of query q are
perm[pos_start[q] : pos_start[q] + pos_count[q]] (items sorted by label). A program owns one
query (forward and the gradient's first pass) or one (query, block of items) tile (the gradient's
second pass); tiles are (positives x items), accumulation in the dtype of S (float32, or float64).
Memory besides S and dS: four numbers per (query, positive) pair.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sigmoid_and_slope(d, inv_tau):
    # the official sigmoid: exponent clamped to [-50, 50]; zero slope where clamped (as autograd)
    e = -d * inv_tau
    inside = (e >= -50.0) & (e <= 50.0)
    e = tl.minimum(tl.maximum(e, -50.0), 50.0)
    sg = 1.0 / (1.0 + tl.exp(e))
    slope = tl.where(inside, sg * (1.0 - sg) * inv_tau, 0.0)
    return sg, slope


@triton.jit
def _query(q, sim_ptr, labels_ptr, qitem_ptr, start_ptr, count_ptr, ld):
    """Query q's similarity row, own item, label and positive segment (start, count)."""
    row = sim_ptr + q.to(tl.int64) * ld
    self_i = tl.load(qitem_ptr + q)
    label = tl.load(labels_ptr + self_i)
    start = tl.load(start_ptr + q)
    cnt = tl.load(count_ptr + q).to(tl.int32)
    return row, self_i, label, start, cnt


@triton.jit
def _positive_block(j0, cnt, row, perm_ptr, start, self_i, PAPER: tl.constexpr, BLOCK_J: tl.constexpr):
    """Block j0 of the query's positives: slots, validity, items and their similarities."""
    jj = j0 + tl.arange(0, BLOCK_J)
    jm = jj < cnt
    jitem = tl.load(perm_ptr + start + jj, mask=jm, other=0)
    if PAPER:
        jm = jm & (jitem != self_i)
    sj = tl.load(row + jitem, mask=jm, other=0.0)
    return jj, jm, jitem, sj


@triton.jit
def _ranks_kernel(
    sim_ptr, labels_ptr, qitem_ptr, perm_ptr, start_ptr, count_ptr, ap_ptr,
    pair_off_ptr, alpha_ptr, beta_ptr, self_ptr,
    B, ld, inv_tau,
    PAPER: tl.constexpr, COEFS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ap[q] (forward) and, with COEFS, the per-positive gradient coefficients (first pass)."""
    q = tl.program_id(0)
    row, self_i, label, start, cnt = _query(q, sim_ptr, labels_ptr, qitem_ptr, start_ptr, count_ptr, ld)
    zero = tl.load(row) * 0.0  # the accumulation dtype (that of S)
    total = zero
    for j0 in range(0, cnt, BLOCK_J):
        jj, jm, jitem, sj = _positive_block(j0, cnt, row, perm_ptr, start, self_i, PAPER, BLOCK_J)
        a = tl.zeros((BLOCK_J,), dtype=sj.dtype)
        b = tl.zeros((BLOCK_J,), dtype=sj.dtype)
        ga = tl.zeros((BLOCK_J,), dtype=sj.dtype)
        gb = tl.zeros((BLOCK_J,), dtype=sj.dtype)
        for k0 in range(0, B, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < B
            sk = tl.load(row + ks, mask=km, other=0.0)
            lk = tl.load(labels_ptr + ks, mask=km, other=0)
            in_k = km
            if PAPER:
                in_k = in_k & (ks != self_i)
            in_all = in_k[None, :] & (ks[None, :] != jitem[:, None])
            in_pos = in_all & (lk == label)[None, :]
            sg, slope = _sigmoid_and_slope(sk[None, :] - sj[:, None], inv_tau)
            b += tl.sum(tl.where(in_all, sg, 0.0), 1)
            a += tl.sum(tl.where(in_pos, sg, 0.0), 1)
            if COEFS:
                gb += tl.sum(tl.where(in_all, slope, 0.0), 1)
                ga += tl.sum(tl.where(in_pos, slope, 0.0), 1)
        ra = 1.0 + a
        rb = 1.0 + b
        total += tl.sum(tl.where(jm, ra / rb, 0.0), 0)
        if COEFS:
            # d(R_pos / R_all) = alpha dR_pos - beta dR_all; s_j enters its own ranks with a minus sign
            alpha = tl.where(jm, 1.0 / rb, 0.0)
            beta = tl.where(jm, ra / (rb * rb), 0.0)
            selft = -alpha * ga + beta * gb
            base = tl.load(pair_off_ptr + q)
            pm = jj < cnt
            tl.store(alpha_ptr + base + jj, alpha, mask=pm)
            tl.store(beta_ptr + base + jj, beta, mask=pm)
            tl.store(self_ptr + base + jj, selft, mask=pm)
    np_ = cnt - 1 if PAPER else cnt
    ap = tl.where(np_ > 0, total / tl.maximum(np_, 1).to(total.dtype), zero)
    tl.store(ap_ptr + q, ap)


@triton.jit
def _grad_kernel(
    sim_ptr, labels_ptr, qitem_ptr, perm_ptr, start_ptr, count_ptr, grad_ap_ptr,
    pair_off_ptr, alpha_ptr, beta_ptr, self_ptr, dsim_ptr,
    B, ld, inv_tau,
    PAPER: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dsim[q, k] = grad_ap[q] / |P| * sum_j (alpha_j [k in P] - beta_j [k in Omega]) slope(s_k - s_j)
    (k != j), plus the self term of k when k is a positive."""
    q = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = ks < B
    row, self_i, label, start, cnt = _query(q, sim_ptr, labels_ptr, qitem_ptr, start_ptr, count_ptr, ld)
    base = tl.load(pair_off_ptr + q)
    sk = tl.load(row + ks, mask=km, other=0.0)
    lk = tl.load(labels_ptr + ks, mask=km, other=0)
    in_all_k = km
    if PAPER:
        in_all_k = in_all_k & (ks != self_i)
    in_pos_k = in_all_k & (lk == label)
    acc = tl.zeros((BLOCK_K,), dtype=sk.dtype)
    for j0 in range(0, cnt, BLOCK_J):
        jj, jm, jitem, sj = _positive_block(j0, cnt, row, perm_ptr, start, self_i, PAPER, BLOCK_J)
        al = tl.load(alpha_ptr + base + jj, mask=jm, other=0.0)
        be = tl.load(beta_ptr + base + jj, mask=jm, other=0.0)
        st = tl.load(self_ptr + base + jj, mask=jm, other=0.0)
        _, slope = _sigmoid_and_slope(sk[None, :] - sj[:, None], inv_tau)
        w = al[:, None] * in_pos_k[None, :].to(sk.dtype) - be[:, None] * in_all_k[None, :].to(sk.dtype)
        is_j = ks[None, :] == jitem[:, None]
        w = tl.where(jm[:, None] & ~is_j, w, 0.0)
        acc += tl.sum(w * slope, 0)
        acc += tl.sum(tl.where(jm[:, None] & is_j, st[:, None], 0.0), 0)
    np_ = cnt - 1 if PAPER else cnt
    g = tl.load(grad_ap_ptr + q).to(sk.dtype)
    c = tl.where(np_ > 0, g / tl.maximum(np_, 1).to(sk.dtype), 0.0)
    tl.store(dsim_ptr + q.to(tl.int64) * B + ks, c * acc, mask=km)


_BLOCK_J = 8
_BLOCK_K = 256


def ranks(sim, labels, query_item, perm, pos_start, pos_count, temperature, paper, coefs=False):
    """ap (Q,) in S's dtype; with coefs, also the per-(query, positive) coefficient buffers."""
    Q, B = sim.shape
    ap = torch.empty(Q, dtype=sim.dtype, device=sim.device)
    pair_off = torch.cumsum(pos_count, 0) - pos_count
    # one slot per (query, positive): sum of the class sizes (one host read of a scalar)
    n_pairs = max(1, int(pos_count.sum())) if coefs else 1
    alpha = torch.empty(n_pairs, dtype=sim.dtype, device=sim.device)
    beta = torch.empty_like(alpha)
    selft = torch.empty_like(alpha)
    if Q:
        _ranks_kernel[(Q,)](
            sim, labels, query_item, perm, pos_start, pos_count, ap, pair_off, alpha, beta, selft,
            B, sim.stride(0), 1.0 / temperature,
            PAPER=bool(paper), COEFS=bool(coefs), BLOCK_J=_BLOCK_J, BLOCK_K=_BLOCK_K,
        )
    return ap, (pair_off, alpha, beta, selft)


def grad(sim, labels, query_item, perm, pos_start, pos_count, grad_ap, temperature, paper):
    """dsim (Q, B): the gradient of sum_q grad_ap[q] * ap[q] with respect to S."""
    Q, B = sim.shape
    dsim = torch.empty((Q, B), dtype=sim.dtype, device=sim.device)
    if Q == 0 or B == 0:
        return dsim
    _, (pair_off, alpha, beta, selft) = ranks(sim, labels, query_item, perm, pos_start, pos_count, temperature,
                                              paper, coefs=True)
    grid = (Q, triton.cdiv(B, _BLOCK_K))
    _grad_kernel[grid](
        sim, labels, query_item, perm, pos_start, pos_count, grad_ap.to(sim.dtype).contiguous(),
        pair_off, alpha, beta, selft, dsim,
        B, sim.stride(0), 1.0 / temperature,
        PAPER=bool(paper), BLOCK_J=_BLOCK_J, BLOCK_K=_BLOCK_K,
    )
    return dsim
