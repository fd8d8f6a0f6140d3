"""Triton kernels of the Hungarian matching core: the fused DETR matching cost.

One program per (image, block of queries): it computes the softmax normaliser of its queries
once (online log-sum-exp over the classes), then walks the image's own targets in blocks,
gathering only the logits of the target classes, and writes class + L1 + GIoU cost in one pass.
The (B*Q) x (sum T) matrix of the official matcher is never formed.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _detr_cost_kernel(
    logits_ptr, boxes_ptr, labels_ptr, tboxes_ptr, offsets_ptr, counts_ptr, out_ptr,
    Q, K, TMAX,
    s_lb, s_lq, s_lk,
    s_bb, s_bq, s_bc,
    s_tb, s_tc,
    s_lab,
    w_class, w_bbox, w_giou, alpha, gamma,
    FOCAL: tl.constexpr, F64: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32
    b = tl.program_id(0)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = q < Q
    count = tl.load(counts_ptr + b)
    off = tl.load(offsets_ptr + b)
    lrow = logits_ptr + b * s_lb + q * s_lq

    # softmax normaliser per query (DETR); focal cost needs none
    m = tl.zeros((BLOCK_Q,), CDT)
    s = tl.zeros((BLOCK_Q,), CDT)
    if not FOCAL:
        m = tl.full((BLOCK_Q,), float("-inf"), CDT)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(lrow[:, None] + k[None, :] * s_lk, mask=qm[:, None] & (k < K)[None, :],
                        other=float("-inf")).to(CDT)
            x = tl.where(qm[:, None], x, 0.0)  # rows past Q: keep the arithmetic finite
            m_new = tl.maximum(m, tl.max(x, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new

    bq = boxes_ptr + b * s_bb + q * s_bq
    qcx = tl.load(bq, mask=qm, other=0.5).to(CDT)
    qcy = tl.load(bq + s_bc, mask=qm, other=0.5).to(CDT)
    qw = tl.load(bq + 2 * s_bc, mask=qm, other=1.0).to(CDT)
    qh = tl.load(bq + 3 * s_bc, mask=qm, other=1.0).to(CDT)
    qx0 = qcx - 0.5 * qw
    qy0 = qcy - 0.5 * qh
    qx1 = qcx + 0.5 * qw
    qy1 = qcy + 0.5 * qh
    q_area = (qx1 - qx0) * (qy1 - qy0)

    for t0 in range(0, TMAX, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < count
        g = off + t
        lab = tl.load(labels_ptr + g * s_lab, mask=tm, other=0)
        tb = tboxes_ptr + g * s_tb
        tcx = tl.load(tb, mask=tm, other=0.5).to(CDT)
        tcy = tl.load(tb + s_tc, mask=tm, other=0.5).to(CDT)
        tw = tl.load(tb + 2 * s_tc, mask=tm, other=1.0).to(CDT)
        th = tl.load(tb + 3 * s_tc, mask=tm, other=1.0).to(CDT)

        x = tl.load(lrow[:, None] + lab[None, :] * s_lk, mask=qm[:, None] & tm[None, :], other=0.0).to(CDT)
        if FOCAL:  # Deformable-DETR / DINO focal class cost
            p = 1.0 / (1.0 + tl.exp(-x))
            neg = (1.0 - alpha) * tl.exp(gamma * tl.log(p)) * (-tl.log(1.0 - p + 1e-8))
            pos = alpha * tl.exp(gamma * tl.log(1.0 - p)) * (-tl.log(p + 1e-8))
            c_class = pos - neg
        else:
            c_class = -(tl.exp(x - m[:, None]) / s[:, None])

        c_bbox = (tl.abs(qcx[:, None] - tcx[None, :]) + tl.abs(qcy[:, None] - tcy[None, :])
                  + tl.abs(qw[:, None] - tw[None, :]) + tl.abs(qh[:, None] - th[None, :]))

        tx0 = tcx - 0.5 * tw
        ty0 = tcy - 0.5 * th
        tx1 = tcx + 0.5 * tw
        ty1 = tcy + 0.5 * th
        t_area = (tx1 - tx0) * (ty1 - ty0)
        iw = tl.maximum(tl.minimum(qx1[:, None], tx1[None, :]) - tl.maximum(qx0[:, None], tx0[None, :]), 0.0)
        ih = tl.maximum(tl.minimum(qy1[:, None], ty1[None, :]) - tl.maximum(qy0[:, None], ty0[None, :]), 0.0)
        inter = iw * ih
        union = q_area[:, None] + t_area[None, :] - inter
        hw = tl.maximum(tl.maximum(qx1[:, None], tx1[None, :]) - tl.minimum(qx0[:, None], tx0[None, :]), 0.0)
        hh = tl.maximum(tl.maximum(qy1[:, None], ty1[None, :]) - tl.minimum(qy0[:, None], ty0[None, :]), 0.0)
        hull = hw * hh
        giou = inter / union - (hull - union) / hull

        cost = w_bbox * c_bbox + w_class * c_class - w_giou * giou
        cost = tl.where(tm[None, :], cost, float("inf"))
        optr = out_ptr + (b * Q + q[:, None]) * TMAX + t[None, :]
        tl.store(optr, cost.to(out_ptr.dtype.element_ty), mask=qm[:, None] & (t < TMAX)[None, :])


def detr_match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, tmax, cost_class, cost_bbox,
                    cost_giou, focal, focal_alpha, focal_gamma):
    """Launches the fused cost kernel; returns (B, Q, tmax) float32 (float64 for float64 logits)."""
    B, Q, K = pred_logits.shape
    f64 = pred_logits.dtype == torch.float64
    out = torch.empty((B, Q, tmax), dtype=torch.float64 if f64 else torch.float32, device=pred_logits.device)
    if out.numel() == 0:
        return out
    counts = num_targets.to(torch.int64).contiguous()
    offsets = (torch.cumsum(counts, 0) - counts).contiguous()
    if tgt_labels.numel() == 0:  # keep valid pointers for the (fully masked) target loads
        tgt_labels = torch.zeros(1, dtype=torch.int64, device=out.device)
        tgt_boxes = torch.full((1, 4), 0.5, dtype=out.dtype, device=out.device)
    BLOCK_Q = 32
    BLOCK_T = min(64, max(16, triton.next_power_of_2(tmax)))
    BLOCK_K = min(128, max(16, triton.next_power_of_2(K)))
    grid = (B, triton.cdiv(Q, BLOCK_Q))
    _detr_cost_kernel[grid](
        pred_logits, pred_boxes, tgt_labels, tgt_boxes, offsets, counts, out,
        Q, K, tmax,
        *pred_logits.stride(), *pred_boxes.stride(), *tgt_boxes.stride(), tgt_labels.stride(0),
        float(cost_class), float(cost_bbox), float(cost_giou), float(focal_alpha), float(focal_gamma),
        FOCAL=bool(focal), F64=f64, BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
    )
    return out
