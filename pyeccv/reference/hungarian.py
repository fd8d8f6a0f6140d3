"""References for the Hungarian matching core (DETR, arXiv 2005.12872).

`detr_matcher` behaves like facebookresearch/detr `models/matcher.py::HungarianMatcher`: the cost
of every query against every target of the whole batch, (B*Q) x (sum T), computed on the
prediction's device, moved to the host, split per image and solved by SciPy one image at a time.
`deformable_matcher` is the focal-cost variant of Deformable-DETR / DINO. `scipy_batch` is the
plain SciPy loop over a padded batch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


# ---- box utilities, as DETR's util/box_ops.py -----------------------------------------------
def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    area1, area2 = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of every box in a against every box in b (xyxy)."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area


# ---- the official matcher's cost and assignment ------------------------------------------------
def detr_cost(pred_logits, pred_boxes, tgt_ids, tgt_bbox, *, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
              focal=False, focal_alpha=0.25, focal_gamma=2.0) -> torch.Tensor:
    """The official (B, Q, sum T) cost: every query against every target of the batch."""
    bs, nq = pred_logits.shape[:2]
    out_bbox = pred_boxes.flatten(0, 1)
    if focal:  # Deformable-DETR / DINO
        out_prob = pred_logits.flatten(0, 1).sigmoid()
        neg = (1 - focal_alpha) * (out_prob ** focal_gamma) * (-(1 - out_prob + 1e-8).log())
        pos = focal_alpha * ((1 - out_prob) ** focal_gamma) * (-(out_prob + 1e-8).log())
        c_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    else:  # DETR: softmax probability of the target class
        out_prob = pred_logits.flatten(0, 1).softmax(-1)
        c_class = -out_prob[:, tgt_ids]
    c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    C = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
    return C.view(bs, nq, -1)


@torch.no_grad()
def detr_matcher(outputs, targets, *, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, focal=False,
                 focal_alpha=0.25, focal_gamma=2.0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The official matcher: list of (query indices, target indices) per image, int64 on CPU."""
    from scipy.optimize import linear_sum_assignment

    tgt_ids = torch.cat([v["labels"] for v in targets])
    tgt_bbox = torch.cat([v["boxes"] for v in targets])
    C = detr_cost(outputs["pred_logits"], outputs["pred_boxes"], tgt_ids, tgt_bbox, cost_class=cost_class,
                  cost_bbox=cost_bbox, cost_giou=cost_giou, focal=focal, focal_alpha=focal_alpha,
                  focal_gamma=focal_gamma).cpu()
    sizes = [len(v["boxes"]) for v in targets]
    indices = [linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def padded_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets: Sequence[int], **kw) -> torch.Tensor:
    """Each image's own block of the official cost, padded with +inf to (B, Q, max T)."""
    C = detr_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, **kw)
    B, Q = pred_logits.shape[:2]
    tmax = max(num_targets, default=0)
    out = torch.full((B, Q, tmax), float("inf"), dtype=C.dtype, device=C.device)
    start = 0
    for b, t in enumerate(num_targets):
        out[b, :, :t] = C[b, :, start:start + t]
        start += t
    return out


# ---- SciPy loop over a padded batch -----------------------------------------------------------
def scipy_batch(cost, *, maximize: bool = False, num_rows: Optional[Sequence[int]] = None,
                num_cols: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, N, M) -> (B, N) int64 column per row (-1 unassigned), one SciPy call per problem."""
    from scipy.optimize import linear_sum_assignment

    cost_np = cost.detach().cpu().to(torch.float64).numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost)
    B, N, M = cost_np.shape
    out = np.full((B, N), -1, dtype=np.int64)
    for b in range(B):
        nr = N if num_rows is None else int(num_rows[b])
        nc = M if num_cols is None else int(num_cols[b])
        r, c = linear_sum_assignment(cost_np[b, :nr, :nc], maximize=maximize)
        out[b, r] = c
    result = torch.from_numpy(out)
    return result.to(cost.device) if isinstance(cost, torch.Tensor) else result
