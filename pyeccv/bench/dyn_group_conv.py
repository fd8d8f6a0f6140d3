"""Benchmark cases of the Dynamic Group Convolution core (DGC, Su et al., ECCV 2020): the
saliency-gated multi-head 3x3 convolution (padding 1, 4 heads, C_out = C_in) at gate factors 0.25 and
0.5 (keep = gate * C input channels per head), at B=64, C=256, 14x14; B=64, C=128, 28x28 and
B=1, C=256, 14x14 (plus the small maps of a CIFAR DGC-ResNet-18: B=64, C=256, 8x8 and C=512,
4x4, gate 0.25); the whole DGC layer (BN, ReLU, saliency heads, conv) in eval mode at the final
pruning level; forward at B=8, C=256, 14x14 and C=512, 4x4 at gate 0.5 too; and forward + backward
of the op at B=64, C=128, 28x28; B=8, C=256, 14x14; B=1, C=256, 14x14 and B=64, C=512, 4x4, gate 0.25.

Implementations, on the same float32 inputs (saliency >= 0 with some zeros, as a ReLU output):
- official-masked (the reference): the official computation (hellozhuo/dgc layers.py): one masked
  copy of the input per head, then one grouped conv2d (groups = heads) over all of them;
- dense (baseline): F.conv2d over all C_in input channels: the ordinary convolution DGC replaces,
  and the issue's yardstick (pyeccv should beat it 2x on CPU at gate 0.25);
- ideal-subset (baseline): F.conv2d over keep = gate * C_in input channels to C_out outputs, the
  cost of a static dense conv with the kept channel count (same MACs as DGC's kept channels);
- torch-gather (baseline): pyeccv.dyn_group_conv2d(backend="torch"): the kept channels and filter
  columns gathered, one grouped conv2d over (sample, head);
- pyeccv: pyeccv.dyn_group_conv2d(backend="auto") (C++ on CPU, Triton on GPU).
official-masked, torch-gather and pyeccv must agree (relative error <= 1e-4); dense and ideal-subset
compute something else and are marked "n/a" in the check column.
Floor: x and the weight read once, the output written once (float32); the useful arithmetic is the
kept-channel MACs, 2 * B * C_out * keep * k * k * H_out * W_out flops (Spec.flops, and "gflop" in
the params of the JSON rows).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ._core import Case, Impl, Spec

CORE = "dyn_group_conv"
HEADS = 4
K = 3
NOT_DGC = "n/a (not DGC)"  # check status of the baselines that compute another function


def _inputs(B: int, C: int, H: int, device: str, seed: int):
    """x (B, C, H, H), weight (C, C, 3, 3) (fan-in scaled) and saliency (B, heads, C): positive
    values with about 16% zeros (a ReLU of a shifted normal), float32 on `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g)
    w = torch.randn(C, C, K, K, generator=g) * (2.0 / (C * K * K)) ** 0.5
    sal = torch.relu(torch.randn(B, HEADS, C, generator=g) * 0.5 + 0.5)
    return x.to(device), w.to(device), sal.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(ref_name: str, dgc: Sequence[str], others: Sequence[str]) -> Callable[[Dict[str, Any]], Dict[str, str]]:
    """The DGC implementations against the reference (each output a tensor or a tuple of tensors);
    the other computations get NOT_DGC."""
    def check(outs: Dict[str, Any]) -> Dict[str, str]:
        st = {k: NOT_DGC for k in others if k in outs}
        ref = outs.get(ref_name)
        if ref is None:
            return st
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        for k in dgc:
            if k not in outs:
                continue
            out = outs[k] if isinstance(outs[k], (tuple, list)) else (outs[k],)
            if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
                st[k] = "MISMATCH shape"
                continue
            worst = max(_rel(a, b) for a, b in zip(out, ref))
            st[k] = "ok" if worst <= 1e-4 else f"MISMATCH rel {worst:.1e}"
        return st
    return check


def _params(B, C, H, gate, keep, flops):
    return dict(B=B, C_in=C, C_out=C, H=H, W=H, k=K, heads=HEADS, gate=gate, keep=keep, gflop=flops / 1e9)


def _fwd_case(B: int, C: int, H: int, gate: float, quick: bool) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv
        from ..reference.dyn_group_conv import masked_dyn_group_conv2d

        keep = int(round(C * gate))
        x, w, sal = _inputs(B, C, H, device, seed=B * 1000 + C + H + int(gate * 100))
        x_sub, w_sub = x[:, :keep].contiguous(), w[:, :keep].contiguous()

        def op(backend):
            return lambda: pyeccv.dyn_group_conv2d(x, w, sal, keep=keep, padding=1, backend=backend)

        sub = "quarter" if gate == 0.25 else "half" if gate == 0.5 else f"{gate:g}"
        impls = [
            Impl("official-masked", "reference", lambda: masked_dyn_group_conv2d(x, w, sal, keep, 1, 1),
                 f"official: {HEADS} masked input copies, grouped conv2d (groups={HEADS})"),
            Impl("dense", "baseline", lambda: F.conv2d(x, w, None, 1, 1),
                 f"F.conv2d over all {C} input channels (the conv DGC replaces)"),
            Impl("ideal-subset", "baseline", lambda: F.conv2d(x_sub, w_sub, None, 1, 1),
                 f"F.conv2d over keep={keep} of {C} input channels ({sub}): the static ideal"),
            Impl("torch-gather", "baseline", op("torch"), "pyeccv backend='torch': gather + one grouped conv2d"),
            Impl("pyeccv", "pyeccv", op("auto"), "pyeccv backend='auto' (C++ on CPU, Triton on GPU)"),
        ]
        flops = 2.0 * B * C * keep * K * K * H * H
        nbytes = 4.0 * (B * C * H * H + C * C * K * K + B * HEADS * C + B * C * H * H)
        return Spec(impls, bytes=nbytes, flops=flops,
                    check=_check("official-masked", ("official-masked", "torch-gather", "pyeccv"),
                                 ("dense", "ideal-subset")),
                    params=_params(B, C, H, gate, keep, flops))

    return Case(CORE, f"fwd-B{B}-C{C}-{H}x{H}-g{gate:g}", build, quick=quick)


def _fwd_bwd_case(B: int, C: int, H: int, gate: float, quick: bool) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv
        from ..reference.dyn_group_conv import masked_dyn_group_conv2d

        keep = int(round(C * gate))
        x0, w0, s0 = _inputs(B, C, H, device, seed=B * 1000 + C + H + int(gate * 100) + 7)
        grad = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(C + H)).to(device)

        def fwd_bwd(fn, with_saliency=True):
            def run():
                x = x0.detach().requires_grad_()
                w = w0.detach().requires_grad_()
                s = s0.detach().requires_grad_(with_saliency)
                out = fn(x, w, s)
                out.backward(grad)
                return (out.detach(), x.grad, w.grad) + ((s.grad,) if with_saliency else ())
            return run

        def op(backend):
            return lambda x, w, s: pyeccv.dyn_group_conv2d(x, w, s, keep=keep, padding=1, backend=backend)

        impls = [
            Impl("official-masked", "reference", fwd_bwd(lambda x, w, s: masked_dyn_group_conv2d(x, w, s, keep, 1, 1)),
                 "official masked copies + grouped conv2d, autograd (d x, d weight, d saliency)"),
            Impl("dense", "baseline", fwd_bwd(lambda x, w, s: F.conv2d(x, w, None, 1, 1), with_saliency=False),
                 f"F.conv2d over all {C} input channels, autograd (d x, d weight)"),
            Impl("torch-gather", "baseline", fwd_bwd(op("torch")), "pyeccv backend='torch'"),
            Impl("pyeccv", "pyeccv", fwd_bwd(op("auto")), "pyeccv backend='auto'"),
        ]
        X, W, O = B * C * H * H, C * C * K * K, B * C * H * H
        nbytes = 4.0 * (X + W + O  # forward: x, weight in, out
                        + O + X + W + X + W)  # backward: grad, x, weight in; d x, d weight out
        flops = 3 * 2.0 * B * C * keep * K * K * H * H  # forward, input gradient, weight gradient
        return Spec(impls, bytes=nbytes, flops=flops,
                    check=_check("official-masked", ("official-masked", "torch-gather", "pyeccv"), ("dense",)),
                    params=_params(B, C, H, gate, keep, flops))

    return Case(CORE, f"fwd+bwd-B{B}-C{C}-{H}x{H}-g{gate:g}", build, quick=quick)


def _layer_case(B: int, C: int, H: int, gate: float, quick: bool) -> Case:
    """The whole layer (BN, ReLU, the heads' saliency MLPs, the gated conv), eval mode, no grad, at
    the final pruning level (inactive = round(C * (1 - gate)), where the official schedule ends)."""
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        from ..nn.dgc import DynamicGroupConv2d, drop_count
        from ..reference.dyn_group_conv import DynamicMultiHeadConv

        g = torch.Generator().manual_seed(B + C + H)
        ours = DynamicGroupConv2d(C, C, K, padding=1, heads=HEADS, gate_factor=gate)
        ours.inactive_channels = drop_count(C, gate, 1.0, 0)  # what set_progress(1.0) + a training step sets
        bn = ours.norm  # a trained checkpoint's look: non-trivial BN statistics
        bn.weight.data = torch.rand(C, generator=g) + 0.5
        bn.bias.data = torch.randn(C, generator=g) * 0.1
        bn.running_mean = torch.randn(C, generator=g) * 0.1
        bn.running_var = torch.rand(C, generator=g) + 0.5
        official = DynamicMultiHeadConv(C, C, K, padding=1, heads=HEADS, gate_factor=gate)
        official.load_state_dict(ours.state_dict())
        ours, official = ours.to(device).eval(), official.to(device).eval()
        keep = ours.keep
        assert keep == C - official.inactive_channels == round(C * gate), (keep, official.inactive_channels)
        dense = torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.ReLU(),
                                    torch.nn.Conv2d(C, C, K, padding=1, bias=False)).to(device).eval()
        dense[0].load_state_dict(ours.norm.state_dict())
        dense[2].weight.data = ours.weight().detach().clone()
        x = torch.randn(B, C, H, H, generator=g).to(device)

        def nograd(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        impls = [
            Impl("official-masked", "reference", nograd(lambda: official(x)[0]),
                 "official DynamicMultiHeadConv (reference module), same state_dict"),
            Impl("dense", "baseline", nograd(lambda: dense(x)), "BN, ReLU, dense nn.Conv2d (no saliency)"),
            Impl("torch-gather", "baseline", nograd(lambda: ours(x, backend="torch")),
                 "pyeccv.nn.DynamicGroupConv2d, backend='torch'"),
            Impl("pyeccv", "pyeccv", nograd(lambda: ours(x)), "pyeccv.nn.DynamicGroupConv2d, backend='auto'"),
        ]
        flops = 2.0 * B * C * keep * K * K * H * H
        nbytes = 4.0 * (B * C * H * H + C * C * K * K + B * C * H * H)
        return Spec(impls, bytes=nbytes, flops=flops,
                    check=_check("official-masked", ("official-masked", "torch-gather", "pyeccv"), ("dense",)),
                    params=_params(B, C, H, gate, keep, flops))

    return Case(CORE, f"layer-B{B}-C{C}-{H}x{H}-g{gate:g}", build, quick=quick)


CASES = [
    _fwd_case(64, 256, 14, 0.25, quick=True),
    _fwd_case(64, 256, 14, 0.5, quick=False),
    _fwd_case(64, 128, 28, 0.25, quick=False),
    _fwd_case(64, 128, 28, 0.5, quick=False),
    _fwd_case(1, 256, 14, 0.25, quick=True),
    _fwd_case(1, 256, 14, 0.5, quick=True),
    # small maps: layers 3 and 4 of the official-width DGC-ResNet-18 on 32 x 32 (CIFAR) inputs
    _fwd_case(64, 256, 8, 0.25, quick=False),
    _fwd_case(64, 512, 4, 0.25, quick=False),
    _fwd_case(64, 512, 4, 0.5, quick=False),
    _fwd_case(8, 256, 14, 0.25, quick=False),
    _fwd_case(8, 256, 14, 0.5, quick=False),
    _layer_case(64, 256, 14, 0.25, quick=True),
    _fwd_bwd_case(64, 128, 28, 0.25, quick=True),
    _fwd_bwd_case(8, 256, 14, 0.25, quick=False),
    _fwd_bwd_case(1, 256, 14, 0.25, quick=False),
    _fwd_bwd_case(64, 512, 4, 0.25, quick=False),
]
