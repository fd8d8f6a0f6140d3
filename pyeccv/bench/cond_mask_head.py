"""Benchmark cases of the CondInst dynamic-mask-head core: forward + backward (w.r.t. the mask
features and the dynamic parameters) of the default head (8 features + 2 coordinates -> 8 -> 8 -> 1,
169 parameters) at N=8 images, I=500 instances, 100 x 136 and N=2, I=100, 100 x 168.

Implementations, on the same float32 inputs:
- AdelaiDet (the reference): features copied per instance, grouped conv2d with groups = I;
- bmm (baseline): the same copy, then one batched matmul per layer (a common rewrite);
- pyeccv: `pyeccv.cond_mask_head` (C++ on CPU, Triton on GPU).
Floor: the forward reads the features and writes the logits; the backward reads the features and
the logits' gradient and writes the features' gradient (the parameters are small).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._core import Case, Impl, Spec

CORE = "cond_mask_head"
C, CH, L = 8, 8, 3


def _bmm_head(feats, params, im_inds, locations, soi, stride=8):
    """Per-instance copy + torch.baddbmm per layer (relative coordinates as AdelaiDet)."""
    from ..reference.cond_mask_head import compute_locations

    N, Cf, H, W = feats.shape
    I = params.shape[0]
    loc = compute_locations(H, W, stride, feats.device)
    rel = (locations.float().reshape(-1, 1, 2) - loc.reshape(1, -1, 2)).permute(0, 2, 1) / soi.float().reshape(-1, 1, 1)
    x = torch.cat([rel.to(feats.dtype), feats[im_inds].reshape(I, Cf, H * W)], 1)
    dims = [Cf + 2] + [CH] * (L - 1) + [1]
    wn = [dims[k] * dims[k + 1] for k in range(L)]
    parts = torch.split_with_sizes(params, wn + dims[1:], 1)
    for k in range(L):
        x = torch.baddbmm(parts[L + k].reshape(I, dims[k + 1], 1), parts[k].reshape(I, dims[k + 1], dims[k]), x)
        if k < L - 1:
            x = torch.relu(x)
    return x.reshape(I, H, W)


def _case(N: int, I: int, H: int, W: int, quick: bool = True) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv
        from ..reference.cond_mask_head import cond_mask_head as official

        g = torch.Generator().manual_seed(I * H + W)
        feats0 = torch.randn(N, C, H, W, generator=g).to(device)
        params0 = (torch.randn(I, pyeccv.num_gen_params(C, CH, L), generator=g) * 0.3).to(device)
        im_inds = torch.randint(0, N, (I,), generator=g).to(device)
        locations = (torch.rand(I, 2, generator=g) * torch.tensor([W * 8.0, H * 8.0])).to(device)
        soi = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0])[torch.randint(0, 5, (I,), generator=g)].to(device)
        grad = torch.randn(I, H, W, generator=g).to(device)

        def fwd_bwd(fn):
            def run():
                f = feats0.clone().requires_grad_()
                p = params0.clone().requires_grad_()
                out = fn(f, p)
                out.backward(grad)
                return out.detach().cpu(), f.grad.cpu(), p.grad.cpu()
            return run

        impls = [
            Impl("adelaidet", "reference", fwd_bwd(lambda f, p: official(f, p, im_inds, locations, soi)),
                 "features copied per instance, grouped conv2d"),
            Impl("bmm", "baseline", fwd_bwd(lambda f, p: _bmm_head(f, p, im_inds, locations, soi)),
                 "features copied per instance, baddbmm per layer"),
            Impl("pyeccv", "pyeccv", fwd_bwd(lambda f, p: pyeccv.cond_mask_head(f, p, im_inds, locations, soi)),
                 "C++ / Triton, MLP per (image, pixel tile) in registers"),
        ]

        def check(outs: Dict[str, Any]) -> Dict[str, str]:
            ref = outs.get("adelaidet")
            if ref is None:
                return {}
            st = {}
            for k, out in outs.items():
                worst = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(out, ref))
                st[k] = "ok" if worst <= 1e-4 else f"MISMATCH rel {worst:.1e}"
            return st

        HW = H * W
        nbytes = 4.0 * (2 * N * C * HW + I * HW  # forward: features, logits
                        + 2 * N * C * HW + I * HW)  # backward: features + gradient in, feature gradient out
        per = 2.0 * (80 + 64 + 8)  # flops of one pixel of one instance, forward
        return Spec(impls, bytes=nbytes, flops=per * I * HW * 4, check=check,
                    params=dict(N=N, I=I, H=H, W=W, P=pyeccv.num_gen_params(C, CH, L)))

    return Case(CORE, f"fwd+bwd-N{N}-I{I}-{H}x{W}", build, quick=quick)


CASES = [_case(2, 100, 100, 168), _case(8, 500, 100, 136)]
