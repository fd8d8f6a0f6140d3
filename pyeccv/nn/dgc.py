"""DGC's dynamic group convolution layer (Su et al., ECCV 2020, arXiv 2007.04242) over
pyeccv.dyn_group_conv2d: the official DynamicMultiHeadConv (hellozhuo/dgc layers.py) with the same
parameters, buffers and state_dict keys, so official checkpoints load as they are (strip the
DataParallel "module." prefix first)."""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn

from ..ops.dyn_group_conv import _out_size, _pair, dyn_group_conv2d


def drop_count(in_channels: int, gate_factor: float, progress: float, current: int) -> int:
    """The official progressive schedule (paper Sec. 3.3): no pruning up to 1/12 of training, then
    a linear ramp to round(C_in * (1 - gate_factor)) dropped channels at 3/4, held after; at
    progress <= 1/12 the current count is kept (as the official code does)."""
    if 1.0 / 12 < progress < 3.0 / 4:
        return round(in_channels * (1 - gate_factor) * 3.0 / 2 * (progress - 1.0 / 12))
    if progress >= 3.0 / 4:
        return round(in_channels * (1 - gate_factor))
    return current


class _Head(nn.Module):
    """One head (official HeadConv): its filters and its saliency generator
    avg-pooled input -> fc1 (no bias, C -> C / r) -> ReLU -> fc2 (bias 1) -> ReLU."""

    def __init__(self, in_channels, out_channels, squeeze_rate, kernel_size, stride, padding, dilation, gate_factor):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        self.target_pruning_rate = gate_factor
        if in_channels < 80:  # official: narrower layers squeeze half as hard
            squeeze_rate = squeeze_rate // 2
        hidden = in_channels // squeeze_rate
        if hidden < 1:
            raise ValueError(f"in_channels // squeeze_rate must be >= 1 (the saliency MLP's width), got "
                             f"{in_channels} // {squeeze_rate}")
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.relu_fc1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, in_channels, bias=True)
        self.relu_fc2 = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.relu_fc2(self.fc2(self.relu_fc1(self.fc1(pooled))))


class DynamicGroupConv2d(nn.Module):
    """Official DynamicMultiHeadConv: BN -> ReLU on the input, per-head saliency generators, and a
    multi-head convolution where head h sees only its top input channels (scaled by saliency).

    forward(x) -> out (B, out_channels, H', W'); forward(x, return_lasso=True) -> (out, lasso) with
    lasso = sum over heads of the mean saliency (the official group-lasso term; the official loss
    adds group_lasso_lambda * sum of these over layers). In training mode each forward updates the
    `_inactive_channels` buffer from the progress given to set_progress(p) (p in [0, 1], fraction of
    training done), as the official global_progress does; eval mode uses the buffer as it is.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]], stride=1,
                 padding=0, dilation=1, heads: int = 4, squeeze_rate: int = 16, gate_factor: float = 0.25):
        super().__init__()
        if in_channels % heads != 0 or out_channels % heads != 0:
            raise ValueError(f"heads = {heads} must divide in_channels = {in_channels} and out_channels = "
                             f"{out_channels} (as the official layer asserts)")
        if not 0.0 <= gate_factor <= 1.0:
            raise ValueError(f"gate_factor must be in [0, 1], got {gate_factor}")
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.squeeze_rate, self.gate_factor = squeeze_rate, gate_factor
        self.kernel_size = tuple(_pair("kernel_size", kernel_size))
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.is_pruned = True
        self.progress = 0.0
        self.register_buffer("_inactive_channels", torch.zeros(1))
        for i in range(heads):
            setattr(self, "headconv_%1d" % i, _Head(in_channels, out_channels // heads, squeeze_rate, kernel_size,
                                                    stride, padding, dilation, gate_factor))

    @property
    def inactive_channels(self) -> int:
        return int(self._inactive_channels[0])

    @inactive_channels.setter
    def inactive_channels(self, val: int) -> None:
        self._inactive_channels.fill_(val)

    @property
    def keep(self) -> int:
        """Input channels each head keeps now (before the official tie rule)."""
        return self.in_channels - self.inactive_channels

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; the next training-mode forward applies the schedule."""
        self.progress = float(progress)

    def weight(self) -> torch.Tensor:
        """(out_channels, in_channels, k, k): the heads' filters, head-major (official concat order)."""
        return torch.cat([getattr(self, "headconv_%1d" % i).conv.weight for i in range(self.heads)], 0)

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, C_in) saliency of an already normalised and rectified input."""
        pooled = self.avg_pool(x).flatten(1)
        return torch.stack([getattr(self, "headconv_%1d" % i)(pooled) for i in range(self.heads)], 1)

    def forward(self, x: torch.Tensor, return_lasso: bool = False, backend: str = "auto"):
        if self.training:
            self.inactive_channels = drop_count(self.in_channels, self.gate_factor, self.progress,
                                                self.inactive_channels)
        x = self.relu(self.norm(x))
        sal = self.saliency(x)
        lasso = sal.mean(dim=(0, 2)).sum()  # official: sum over heads of mask.mean()
        keep = self.keep
        weight = self.weight()
        if keep >= 1:
            out = dyn_group_conv2d(x, weight, sal, keep=keep, stride=self.stride, padding=self.padding,
                                   dilation=self.dilation, backend=backend)
        else:  # every channel pruned (gate_factor ~ 0): the official output is all zeros
            s, p, d = (_pair(n, v) for n, v in (("stride", self.stride), ("padding", self.padding),
                                                ("dilation", self.dilation)))
            ho = _out_size(x.shape[2], self.kernel_size[0], s[0], p[0], d[0])
            wo = _out_size(x.shape[3], self.kernel_size[1], s[1], p[1], d[1])
            out = x.new_zeros((x.shape[0], self.out_channels, ho, wo))
        return (out, lasso) if return_lasso else out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, heads={self.heads}, "
                f"squeeze_rate={self.squeeze_rate}, gate_factor={self.gate_factor}")
