"""A retrieval network for Smooth-AP: CNN (or small ResNet) backbone, linear embedding, L2 norm."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        return F.relu(self.b2(self.c2(y)) + self.short(x), inplace=True)


class RetrievalNet(nn.Module):
    """Image -> L2-normalised embedding (so S = X X^T is the cosine similarity Smooth-AP ranks).

    backbone: "cnn" (four conv-bn-relu stages) or "resnet" (a ResNet-18-shaped stack of basic
    blocks, two per stage, at `width`, 2 x `width`, 4 x `width`, 8 x `width` channels).
    """

    def __init__(self, embedding_dim: int = 128, backbone: str = "cnn", in_channels: int = 3, width: int = 32):
        super().__init__()
        if backbone == "cnn":
            self.features = nn.Sequential(_conv_bn(in_channels, width), _conv_bn(width, 2 * width, 2),
                                          _conv_bn(2 * width, 4 * width, 2), _conv_bn(4 * width, 8 * width, 2))
        elif backbone == "resnet":
            layers, cin = [_conv_bn(in_channels, width)], width
            for k, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
                layers += [_BasicBlock(cin, cout, 1 if k == 0 else 2), _BasicBlock(cout, cout, 1)]
                cin = cout
            self.features = nn.Sequential(*layers)
        else:
            raise ValueError(f"backbone must be 'cnn' or 'resnet', got {backbone!r}")
        self.embed = nn.Linear(8 * width, embedding_dim)

    def forward(self, images: Tensor) -> Tensor:
        h = self.features(images).mean(dim=(2, 3))
        return F.normalize(self.embed(h), dim=1)


@torch.no_grad()
def recall_at_1(embeddings: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose nearest other sample (cosine) has the same label."""
    S = embeddings @ embeddings.t()
    S.fill_diagonal_(-float("inf"))
    return float((labels[S.argmax(1)] == labels).float().mean())
