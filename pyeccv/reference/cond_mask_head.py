"""References for CondInst's dynamic mask head (Tian et al., ECCV 2020, arXiv 2003.05664).

`cond_mask_head` follows AdelaiDet's `adet/modeling/condinst/dynamic_mask_head.py` step for step
(`mask_heads_forward_with_coords` without the final upsampling): the feature map is copied once
per instance (`mask_feats[im_inds]`), relative coordinates are computed in float32 against
`compute_locations` and cast to the feature dtype, the generated parameters are split with
`parse_dynamic_params`, and the L layers run as 1x1 convolutions with groups = number of
instances (`mask_heads_forward`). It is the oracle at the official layout and the benchmark
baseline. `aligned_bilinear`, `compute_locations` (adet/utils/comm.py) and `dice_coefficient` are
the official helpers, same math.

`loop_cond_mask_head` is a plain per-instance loop of matrix products written from the contract
(paper Sec. 3.2, Eq. 1-2 of the mask FCN head), an independent second oracle:
  x_w = s * w + s // 2, y_h = s * h + s // 2                  (s = feature stride)
  rel_i(h, w) = ((X_i - x_w) / soi_i, (Y_i - y_h) / soi_i)   (float32, then the feature dtype)
  h_0 = [rel_i ; F_{im(i)}],  h_{l+1} = W_l h_l + b_l,  ReLU between layers, logits = h_L
Parameter layout per instance: all weights (layer 0..L-1, each row-major [out][in]), then all
biases (layer 0..L-1).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def compute_locations(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """(h * w, 2) float32 (x, y) image coordinates of the centres of a stride-`stride` map, row-major."""
    xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1) + stride // 2


def aligned_bilinear(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample (N, C, H, W) by an integer factor to (N, C, factor*H, factor*W), AdelaiDet's way:
    replicate-pad one row/column at the end, align_corners bilinear resize to (factor*H+1,
    factor*W+1), replicate-pad factor//2 at the start, keep the first factor*H x factor*W."""
    assert tensor.dim() == 4
    assert factor >= 1 and int(factor) == factor
    factor = int(factor)
    if factor == 1:
        return tensor
    h, w = tensor.shape[2:]
    tensor = F.pad(tensor, pad=(0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    tensor = F.interpolate(tensor, size=(oh, ow), mode="bilinear", align_corners=True)
    tensor = F.pad(tensor, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return tensor[:, :, :oh - 1, :ow - 1]


def dice_coefficient(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-instance dice loss 1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + 1e-5); x, target (I, ...) -> (I,)."""
    eps = 1e-5
    n_inst = x.size(0)
    x = x.reshape(n_inst, -1)
    target = target.reshape(n_inst, -1)
    intersection = (x * target).sum(dim=1)
    union = (x ** 2.0).sum(dim=1) + (target ** 2.0).sum(dim=1) + eps
    return 1.0 - (2 * intersection / union)


def weight_and_bias_nums(in_channels: int, channels: int = 8, num_layers: int = 3,
                         rel_coords: bool = True) -> Tuple[List[int], List[int]]:
    """Per-layer weight and bias counts of the dynamic head (DynamicMaskHead.__init__)."""
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2, got {num_layers}")
    weight_nums, bias_nums = [], []
    for l in range(num_layers):
        if l == 0:
            weight_nums.append((in_channels + (2 if rel_coords else 0)) * channels)
            bias_nums.append(channels)
        elif l == num_layers - 1:
            weight_nums.append(channels)
            bias_nums.append(1)
        else:
            weight_nums.append(channels * channels)
            bias_nums.append(channels)
    return weight_nums, bias_nums


def parse_dynamic_params(params: torch.Tensor, channels: int, weight_nums: Sequence[int],
                         bias_nums: Sequence[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Split (I, P) generated parameters into grouped-conv weights (I*out, in, 1, 1) and biases (I*out,)."""
    assert params.dim() == 2
    assert len(weight_nums) == len(bias_nums)
    assert params.size(1) == sum(weight_nums) + sum(bias_nums)
    num_insts, num_layers = params.size(0), len(weight_nums)
    splits = list(torch.split_with_sizes(params, list(weight_nums) + list(bias_nums), dim=1))
    weights, biases = splits[:num_layers], splits[num_layers:]
    for l in range(num_layers):
        out = channels if l < num_layers - 1 else 1
        weights[l] = weights[l].reshape(num_insts * out, -1, 1, 1)
        biases[l] = biases[l].reshape(num_insts * out)
    return weights, biases


def mask_heads_forward(features: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       num_insts: int) -> torch.Tensor:
    """(1, I*in0, H, W) -> (1, I, H, W): each layer a 1x1 conv with one group per instance."""
    assert features.dim() == 4
    x = features
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w, bias=b, stride=1, padding=0, groups=num_insts)
        if i < len(weights) - 1:
            x = F.relu(x)
    return x


def cond_mask_head(mask_feats: torch.Tensor, params: torch.Tensor, im_inds: torch.Tensor, locations: torch.Tensor,
                   soi: torch.Tensor, *, feat_stride: int = 8, num_layers: int = 3, channels: int = 8,
                   rel_coords: bool = True) -> torch.Tensor:
    """The official grouped-conv head: (N, C, H, W) features, (I, P) params -> (I, H, W) logits.

    Two departures from the official code, neither of which changes a result it produces:
    locations are taken as float32 before the subtraction (the official instance locations are
    float32 already), and params are cast to the feature dtype (the official conv would refuse a
    mismatch). Zero instances give an empty (0, H, W) (the official grouped conv can't run).
    """
    N, C, H, W = mask_feats.shape
    n_inst = params.shape[0]
    weight_nums, bias_nums = weight_and_bias_nums(C, channels, num_layers, rel_coords)
    if params.dim() != 2 or params.shape[1] != sum(weight_nums) + sum(bias_nums):
        raise ValueError(f"params must have shape (I, {sum(weight_nums) + sum(bias_nums)}), got {tuple(params.shape)}")
    params = params.to(mask_feats.dtype)
    if n_inst == 0:
        return mask_feats[:0, 0] + params.sum() * 0
    feats = mask_feats[im_inds].reshape(n_inst, C, H * W)
    if rel_coords:
        grid = compute_locations(H, W, stride=feat_stride, device=mask_feats.device)
        rel = locations.float().reshape(-1, 1, 2) - grid.reshape(1, -1, 2)
        rel = rel.permute(0, 2, 1) / soi.float().reshape(-1, 1, 1)
        inputs = torch.cat([rel.to(dtype=mask_feats.dtype), feats], dim=1)
    else:
        inputs = feats
    inputs = inputs.reshape(1, -1, H, W)
    weights, biases = parse_dynamic_params(params, channels, weight_nums, bias_nums)
    return mask_heads_forward(inputs, weights, biases, n_inst).reshape(n_inst, H, W)


def loop_cond_mask_head(mask_feats: torch.Tensor, params: torch.Tensor, im_inds: torch.Tensor,
                        locations: torch.Tensor, soi: torch.Tensor, *, feat_stride: int = 8, num_layers: int = 3,
                        channels: int = 8, rel_coords: bool = True) -> torch.Tensor:
    """Per-instance loop of matrix products (the contract, written out); any dtype, float64 for tests."""
    N, C, H, W = mask_feats.shape
    in0 = C + (2 if rel_coords else 0)
    dims = [in0] + [channels] * (num_layers - 1) + [1]
    # centres of the map in image pixels, float32 as the official code has them
    x_w = (torch.arange(W, device=mask_feats.device) * feat_stride + feat_stride // 2).to(torch.float32)
    y_h = (torch.arange(H, device=mask_feats.device) * feat_stride + feat_stride // 2).to(torch.float32)
    outs = []
    for i in range(params.shape[0]):
        h = mask_feats[int(im_inds[i])].reshape(C, H * W)
        if rel_coords:
            loc, s = locations[i].to(torch.float32), soi[i].to(torch.float32)
            rx = ((loc[0] - x_w) / s)[None, :].expand(H, W)
            ry = ((loc[1] - y_h) / s)[:, None].expand(H, W)
            rel = torch.stack([rx, ry]).reshape(2, H * W).to(mask_feats.dtype)
            h = torch.cat([rel, h])
        p = params[i].to(mask_feats.dtype)
        w_off, b_off = 0, sum(dims[l + 1] * dims[l] for l in range(num_layers))
        for l in range(num_layers):
            n_in, n_out = dims[l], dims[l + 1]
            w = p[w_off:w_off + n_out * n_in].reshape(n_out, n_in)
            b = p[b_off:b_off + n_out]
            w_off, b_off = w_off + n_out * n_in, b_off + n_out
            h = w @ h + b[:, None]
            if l < num_layers - 1:
                h = torch.relu(h)
        outs.append(h.reshape(H, W))
    if not outs:
        return mask_feats.new_zeros((0, H, W))
    return torch.stack(outs)
