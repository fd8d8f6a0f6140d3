"""Stateless helpers of the nn layers (pyeccv.nn.functional), with the official definitions.

- `aligned_bilinear` (AdelaiDet adet/utils/comm.py): CondInst's integer-factor upsampling that
  keeps pixel centres aligned with a stride-s feature map.
- `dice_loss` (AdelaiDet's `dice_coefficient` on sigmoid scores): CondInst's mask loss.
"""
from __future__ import annotations

import math
import numbers

import torch.nn.functional as F
from torch import Tensor

__all__ = ["aligned_bilinear", "dice_loss"]


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample x (N, C, H, W) by an integer `factor` to (N, C, factor*H, factor*W).

    AdelaiDet's definition: replicate-pad one row and column at the end, bilinear resize with
    align_corners=True to (factor*H + 1, factor*W + 1), replicate-pad factor // 2 rows and
    columns at the start, keep the first factor*H rows and factor*W columns. Output pixel k then
    samples input coordinate max(k - factor // 2, 0) / factor (clamped at the far edge), so the
    centres of a stride-s map land on the centres of the stride-(s / factor) map. factor 1
    returns x itself.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    if factor == 1:
        return x
    h, w = x.shape[2:]
    if h == 0 or w == 0:
        return x.new_empty(x.shape[0], x.shape[1], factor * h, factor * w)
    oh, ow = factor * h + 1, factor * w + 1
    y = F.pad(x, pad=(0, 1, 0, 1), mode="replicate")
    y = F.interpolate(y, size=(oh, ow), mode="bilinear", align_corners=True)
    y = F.pad(y, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return y[:, :, :oh - 1, :ow - 1]


def dice_loss(logits: Tensor, targets: Tensor, reduction: str = "none", eps: float = 1e-5) -> Tensor:
    """CondInst's dice loss per instance: with p = sigmoid(logits), flattened per instance,
        loss_i = 1 - 2 sum(p_i t_i) / (sum(p_i^2) + sum(t_i^2) + eps).

    logits (I, ...) and targets of the same shape (any dtype; cast to logits' dtype, as AdelaiDet
    casts its bitmasks). reduction "none" returns the (I,) vector (AdelaiDet's
    `dice_coefficient(mask_scores, gt_bitmasks)`), "mean" its mean (CondInst's `loss_mask`; NaN
    for I = 0, like torch's own losses; CondInst replaces that case by a zero "dummy" loss),
    "sum" its sum.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point torch.Tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1:
        raise ValueError("logits must have a leading instance dimension, got a 0-D tensor")
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets must be on {logits.device} (the device of logits), got {targets.device}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    n, k = logits.shape[0], math.prod(logits.shape[1:])  # explicit k: reshape(0, -1) is ambiguous
    p = logits.sigmoid().reshape(n, k)
    t = targets.to(logits.dtype).reshape(n, k)
    intersection = (p * t).sum(dim=1)
    union = (p * p).sum(dim=1) + (t * t).sum(dim=1) + eps
    loss = 1.0 - 2.0 * intersection / union
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
