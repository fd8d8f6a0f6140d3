"""DGC-ResNet-18 (Su et al., ECCV 2020): the official dyresnet18 (hellozhuo/dgc
models/dynamic_resnet.py) over pyeccv.nn.DynamicGroupConv2d, with the same state_dict keys
(conv1, bn1, layerL.B.conv1/bn1/conv2/bn2, layerL.0.downsample.0 (DGC 1x1) / .1.norm, fc), so
official checkpoints load (strip the DataParallel "module." prefix). forward(x, progress=None)
returns (logits, lasso_list) like the official model; the official training loss is
cross_entropy + group_lasso_lambda * sum(lasso_list) (lambda 1e-5 by default).

stem="imagenet" is the official stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool). stem="cifar" is
ours (the official repository has no CIFAR ResNet): a 3x3/1 conv and no max pool, for 32x32
inputs; same keys (conv1.weight is then (64, 3, 3, 3)). width=64 is the official base width; a
narrower one (a multiple of heads) scales every stage (width, 2, 4, 8 x width), same keys.

recalibrate_bn(batches) recomputes every BN's running statistics at the current weights and
pruning level (exact averages over the batches, "precise BN"). The official model is sensitive to
them: a DGC layer multiplies its input by a saliency computed from that same input, so a scale
error of the running statistics grows from layer to layer in eval mode.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..nn.dgc import DynamicGroupConv2d


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, heads=4, squeeze_rate=16, gate_factor=0.25):
        super().__init__()
        kw = dict(heads=heads, squeeze_rate=squeeze_rate, gate_factor=gate_factor)
        self.conv1 = DynamicGroupConv2d(inplanes, planes, 3, stride=stride, padding=1, **kw)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = DynamicGroupConv2d(planes, planes, 3, stride=1, padding=1, **kw)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor, lasso: List[torch.Tensor], backend: str = "auto") -> torch.Tensor:
        out, l1 = self.conv1(x, return_lasso=True, backend=backend)
        lasso.append(l1)
        out, l2 = self.conv2(self.relu(self.bn1(out)), return_lasso=True, backend=backend)
        lasso.append(l2)
        out = self.bn2(out)
        identity = x
        if self.downsample is not None:
            identity, ld = self.downsample[0](x, return_lasso=True, backend=backend)
            identity = self.downsample[1](identity)
            lasso.append(ld)
        return self.relu(out + identity)


class NormAfterDownsample(nn.Module):
    """Official Norm_after_downsample: the BN after a DGC 1x1 shortcut (key: downsample.1.norm)."""

    def __init__(self, planes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class DGCResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, stem: str = "imagenet", heads: int = 4,
                 squeeze_rate: int = 16, gate_factor: float = 0.25, zero_init_residual: bool = False,
                 width: int = 64):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if not isinstance(width, int) or width < 1 or width % heads:
            raise ValueError(f"width must be a positive multiple of heads = {heads}, got {width!r}")
        self._cfg = dict(heads=heads, squeeze_rate=squeeze_rate, gate_factor=gate_factor)
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # official init: every conv (the heads' filters too) kaiming fan_out
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                DynamicGroupConv2d(self.inplanes, planes, 1, stride=stride, padding=0, **self._cfg),
                NormAfterDownsample(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, **self._cfg)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, **self._cfg) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] for every DGC layer's pruning schedule."""
        for m in self.modules():
            if isinstance(m, DynamicGroupConv2d):
                m.set_progress(progress)

    def forward(self, x: torch.Tensor, progress: Optional[float] = None, backend: str = "auto"
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(logits, lasso_list); progress (if given) is passed to set_progress first; backend is
        that of pyeccv.dyn_group_conv2d for every DGC layer."""
        if progress is not None:
            self.set_progress(progress)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        lasso: List[torch.Tensor] = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x, lasso, backend)
        return self.fc(torch.flatten(self.avgpool(x), 1)), lasso

    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable[torch.Tensor], backend: str = "auto") -> int:
        """Recompute every BatchNorm's running mean and variance as the exact average of the batch
        statistics over `batches` (input tensors, e.g. a few hundred training images in batches of
        the training size) at the current weights and pruning level; nothing else changes (the
        pruning level is not advanced, no parameter is touched, the training flag is restored).
        Returns the number of images seen. Use it after training, before eval-mode inference."""
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved_momentum = [m.momentum for m in bns]
        dgc = [m for m in self.modules() if isinstance(m, DynamicGroupConv2d)]
        saved_inactive = [m._inactive_channels.clone() for m in dgc]
        was = self.training
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        self.train()
        seen = 0
        try:
            for xb in batches:
                self(xb, backend=backend)
                seen += int(xb.shape[0])
        finally:
            for m, mom in zip(bns, saved_momentum):
                m.momentum = mom
            for m, buf in zip(dgc, saved_inactive):
                m._inactive_channels.copy_(buf)
            self.train(was)
        if seen == 0:
            raise ValueError("recalibrate_bn: batches was empty")
        return seen


def dgc_resnet18(num_classes: int = 1000, *, stem: str = "imagenet", heads: int = 4, squeeze_rate: int = 16,
                 gate_factor: float = 0.25, zero_init_residual: bool = False, width: int = 64) -> DGCResNet:
    """The official dyresnet18 (BasicBlock, [2, 2, 2, 2], every conv but the stem a DGC layer);
    width: base channels (official 64; stages width, 2, 4, 8 x width)."""
    return DGCResNet((2, 2, 2, 2), num_classes, stem, heads, squeeze_rate, gate_factor, zero_init_residual, width)
