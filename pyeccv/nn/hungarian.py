"""DETR's HungarianMatcher on pyeccv's fused cost and batched exact assignment."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.hungarian import _raise_for_status, detr_match_cost, lsap_batch_unchecked

Indices = List[Tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """Drop-in for DETR's `HungarianMatcher` (and, with focal=True, Deformable-DETR's / DINO's).

    forward(outputs, targets): outputs["pred_logits"] (B, Q, K), outputs["pred_boxes"] (B, Q, 4);
    targets a list of B dicts with "labels" (T_b,) and "boxes" (T_b, 4). Returns, per image, a
    tuple (query indices, target indices) of int64 CPU tensors, queries sorted, as DETR does.
    The cost is built per image on the predictions' device, all images are solved in one batched
    call, and one device-to-host copy brings the answer back.
    `match_all` does the same for the final and every auxiliary decoder output at once.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2, focal: bool = False,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all costs can't be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal={self.focal}")

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Indices:
        return self._match([outputs], targets)[0]

    @torch.no_grad()
    def match_all(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Indices]:
        """[indices of the final output, then of each outputs["aux_outputs"][l]], one host transfer."""
        return self._match([outputs] + list(outputs.get("aux_outputs", [])), targets)

    def _match(self, layers: Sequence[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]]) -> List[Indices]:
        L = len(layers)
        B, Q = layers[0]["pred_logits"].shape[:2]
        if len(targets) != B:
            raise ValueError(f"targets must hold one dict per image ({B}), got {len(targets)}")
        dev = layers[0]["pred_logits"].device
        sizes = [int(t["labels"].shape[0]) for t in targets]
        labels = torch.cat([t["labels"] for t in targets]).to(dev) if B else torch.zeros(0, dtype=torch.int64,
                                                                                          device=dev)
        boxes = torch.cat([t["boxes"] for t in targets]).to(dev) if B else torch.zeros(0, 4, device=dev)
        logits = torch.cat([o["pred_logits"] for o in layers]) if L > 1 else layers[0]["pred_logits"]
        pboxes = torch.cat([o["pred_boxes"] for o in layers]) if L > 1 else layers[0]["pred_boxes"]
        if L > 1:
            labels, boxes, all_sizes = labels.repeat(L), boxes.repeat(L, 1), sizes * L
        else:
            all_sizes = sizes
        cost = detr_match_cost(logits, pboxes, labels, boxes, all_sizes, cost_class=self.cost_class,
                               cost_bbox=self.cost_bbox, cost_giou=self.cost_giou, focal=self.focal,
                               focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma)
        num_cols = torch.tensor(all_sizes, dtype=torch.int64, device=dev)
        col, status = lsap_batch_unchecked(cost, None, num_cols, False)
        # one device-to-host copy for the whole answer (statuses ride along in the last column)
        host = torch.cat([col, status.to(torch.int64)[:, None]], 1).cpu()
        _raise_for_status(host[:, -1], rows=Q, cols=cost.shape[2], name="cost")
        col = host[:, :-1]
        # all images at once: (image, query) pairs in row-major order, then one split per layer
        mask = col >= 0
        counts = mask.sum(1).tolist()
        qi = torch.nonzero(mask)[:, 1].split(counts)
        tj = col[mask].split(counts)
        out: List[Indices] = [list(zip(qi[l * B:(l + 1) * B], tj[l * B:(l + 1) * B])) for l in range(L)]
        return out
