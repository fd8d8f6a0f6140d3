"""References for Dynamic Group Convolution (Su et al., ECCV 2020, arXiv 2007.04242).

Written from the official code (hellozhuo/dgc, `layers.py`: DynamicMultiHeadConv + HeadConv;
`models/dynamic_resnet.py`: dyresnet18), same math, own words. The masked computation
materialises one full masked copy of the input per head and runs a dense grouped convolution,
exactly as the official forward does; it is the oracle and the benchmark baseline, never the
fast path (pyeccv.dyn_group_conv2d skips the pruned channels).

Official behaviour reproduced here (line numbers of layers.py at commit 6b36c9f):
- Pruning rule (HeadConv.forward, ~l.110-118): with d = C_in - keep > 0 channels to drop, the
  threshold is the largest of the d smallest saliencies (`topk(d, largest=False)` then `max`), and
  EVERY channel whose saliency is <= that threshold is zeroed (`mask.le(threshold)`). So with ties
  at the threshold more than d channels are dropped (the kept set is {s > threshold}, at most
  `keep` channels). With d == 0 nothing is thresholded: all channels are kept (zero saliencies
  included, and they still receive gradient).
- Input scaling: x * mask_c, mask_c = saliency with the dropped entries set to 0 (a clone, so the
  saliency gradient reaches the kept channels only).
- Output order (DynamicMultiHeadConv.forward, ~l.68-76): head outputs are concatenated head-major
  by a grouped conv (groups = heads) over the heads' masked copies and filters (filters
  concatenated head by head along dim 0), then `view(b, heads, c // heads, h, w).transpose(1, 2)`:
  final channel j * heads + h holds filter j of head h (heads interleaved).
- Progressive schedule (~l.47-53, training only): with progress p in [0, 1],
  1/12 < p < 3/4 -> inactive = round(C_in * (1 - gate_factor) * 1.5 * (p - 1/12)),
  p >= 3/4 -> inactive = round(C_in * (1 - gate_factor)); otherwise the buffer keeps its value.
- Saliency generator per head (HeadConv): global average pool of the BN-ReLU input, fc1 (no bias,
  C -> C // r with r = squeeze_rate // 2 when C < 80), ReLU, fc2 (bias, init 1), ReLU; fc weights
  kaiming-normal. Lasso term per head: mean of the saliency over batch and channels; the module
  returns the sum over heads.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Pair = Union[int, Sequence[int]]


def drop_count(in_channels: int, gate_factor: float, progress: float, current: int) -> int:
    """The official schedule: channels to deactivate at training progress p (else `current`)."""
    if 1.0 / 12 < progress < 3.0 / 4:
        return round(in_channels * (1 - gate_factor) * 3.0 / 2 * (progress - 1.0 / 12))
    if progress >= 3.0 / 4:
        return round(in_channels * (1 - gate_factor))
    return current


def prune_saliency(saliency: torch.Tensor, inactive: int) -> torch.Tensor:
    """Official HeadConv masking of a (b, c) saliency: zero every channel <= the largest of the
    `inactive` smallest (ties at the threshold are all dropped). Differentiable like the official
    clone-and-assign (the dropped entries get no gradient)."""
    if inactive <= 0:
        return saliency
    detached = saliency.detach()
    smallest, _ = detached.topk(inactive, dim=1, largest=False, sorted=False)
    threshold, _ = smallest.max(dim=1, keepdim=True)
    out = saliency.clone()
    out[detached.le(threshold)] = 0
    return out


def masked_dyn_group_conv2d(x: torch.Tensor, weight: torch.Tensor, saliency: torch.Tensor, keep: int,
                            stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1) -> torch.Tensor:
    """The official masked computation. x (B, C_in, H, W); weight (C_out, C_in, k, k) with head h
    owning rows [h * C_out / heads, (h + 1) * C_out / heads); saliency (B, heads, C_in) >= 0;
    keep channels per head (before the tie rule). Returns (B, C_out, H', W'), heads interleaved."""
    b, c = x.shape[:2]
    heads = saliency.shape[1]
    inactive = c - keep
    masked = []
    for h in range(heads):
        m = prune_saliency(saliency[:, h], inactive)
        masked.append(x * m.view(b, c, 1, 1))
    out = F.conv2d(torch.cat(masked, dim=1), weight, None, stride, padding, dilation, heads)
    n, co, ho, wo = out.shape
    return out.view(n, heads, co // heads, ho, wo).transpose(1, 2).contiguous().view(n, co, ho, wo)


# ---- the official module, structured like layers.py (same state_dict keys) ---------------------
class HeadConv(nn.Module):
    """One head: its filters (`conv`) and its saliency generator (fc1 -> ReLU -> fc2 -> ReLU)."""

    def __init__(self, in_channels, out_channels, squeeze_rate, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, gate_factor=0.25):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1,
                              bias=False)
        self.target_pruning_rate = gate_factor
        if in_channels < 80:
            squeeze_rate = squeeze_rate // 2
        self.fc1 = nn.Linear(in_channels, in_channels // squeeze_rate, bias=False)
        self.relu_fc1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(in_channels // squeeze_rate, in_channels, bias=True)
        self.relu_fc2 = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)

    def saliency(self, x_averaged: torch.Tensor) -> torch.Tensor:
        return self.relu_fc2(self.fc2(self.relu_fc1(self.fc1(x_averaged.flatten(1)))))

    def forward(self, x, x_averaged, inactive_channels):
        mask = self.saliency(x_averaged)
        lasso = mask.mean()
        pruned = prune_saliency(mask, inactive_channels)
        return x * pruned.view(*pruned.shape, 1, 1), lasso


class DynamicMultiHeadConv(nn.Module):
    """The official DGC layer: BN -> ReLU -> per-head saliency-masked copies -> grouped conv.
    forward returns [out, lasso] like the official one; progress is a class-level global."""
    global_progress = 0.0

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, heads=4,
                 squeeze_rate=16, gate_factor=0.25):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.squeeze_rate, self.gate_factor = squeeze_rate, gate_factor
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.is_pruned = True
        self.register_buffer("_inactive_channels", torch.zeros(1))
        assert in_channels % heads == 0 and out_channels % heads == 0 and gate_factor <= 1.0
        for i in range(heads):
            setattr(self, "headconv_%1d" % i, HeadConv(in_channels, out_channels // heads, squeeze_rate, kernel_size,
                                                       stride, padding, dilation, 1, gate_factor))

    @property
    def inactive_channels(self) -> int:
        return int(self._inactive_channels[0])

    @inactive_channels.setter
    def inactive_channels(self, val) -> None:
        self._inactive_channels.fill_(val)

    def forward(self, x):
        if self.training:
            self.inactive_channels = drop_count(self.in_channels, self.gate_factor,
                                                DynamicMultiHeadConv.global_progress, self.inactive_channels)
        x = self.relu(self.norm(x))
        x_averaged = self.avg_pool(x)
        masked, weights, lasso = [], [], 0.0
        for i in range(self.heads):
            head = getattr(self, "headconv_%1d" % i)
            xi, li = head(x, x_averaged, self.inactive_channels)
            masked.append(xi)
            weights.append(head.conv.weight)
            lasso = lasso + li
        out = F.conv2d(torch.cat(masked, 1), torch.cat(weights, 0), None, self.stride, self.padding, self.dilation,
                       self.heads)
        b, c, h, w = out.shape
        out = out.view(b, self.heads, c // self.heads, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return [out, lasso]

    def saliencies(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, C_in) saliency of the BN-ReLU input (no schedule update): for op-level tests."""
        xa = self.avg_pool(F.relu(self.norm(x)))
        return torch.stack([getattr(self, "headconv_%1d" % i).saliency(xa) for i in range(self.heads)], 1)


# ---- the official dyresnet18 (models/dynamic_resnet.py), same structure and keys ---------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, heads, squeeze_rate, gate_factor, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        kw = dict(heads=heads, squeeze_rate=squeeze_rate, gate_factor=gate_factor)
        self.conv1 = DynamicMultiHeadConv(inplanes, planes, 3, stride=stride, padding=1, **kw)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = DynamicMultiHeadConv(planes, planes, 3, stride=1, padding=1, **kw)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        inp, lasso = x
        out, l1 = self.conv1(inp)
        lasso.append(l1)
        out = self.relu(self.bn1(out))
        out, l2 = self.conv2(out)
        lasso.append(l2)
        out = self.bn2(out)
        identity = inp
        if self.downsample is not None:
            identity, ld = self.downsample(inp)
            lasso.append(ld)
        return [self.relu(out + identity), lasso]


class NormAfterDownsample(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.norm = nn.BatchNorm2d(planes)

    def forward(self, x):
        return [self.norm(x[0]), x[1]]


class DyResNet(nn.Module):
    """Official ResNet with DGC layers (ImageNet stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool)."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes=1000, heads=4, squeeze_rate=16, gate_factor=0.25):
        super().__init__()
        self._cfg = (heads, squeeze_rate, gate_factor)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                DynamicMultiHeadConv(self.inplanes, planes, 1, stride=stride, padding=0, heads=self._cfg[0],
                                     squeeze_rate=self._cfg[1], gate_factor=self._cfg[2]),
                NormAfterDownsample(planes))
        layers = [BasicBlock(*self._cfg, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(*self._cfg, planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, progress=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if progress:  # the official truthiness test: progress 0.0 leaves the global alone
            DynamicMultiHeadConv.global_progress = progress
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x, lasso = self.layer4(self.layer3(self.layer2(self.layer1([x, []]))))
        return self.fc(torch.flatten(self.avgpool(x), 1)), lasso


def dyresnet18(num_classes: int = 1000, heads: int = 4, squeeze_rate: int = 16, gate_factor: float = 0.25):
    return DyResNet((2, 2, 2, 2), num_classes, heads, squeeze_rate, gate_factor)
