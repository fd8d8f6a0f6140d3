"""Benchmark cases of the Smooth-AP core: forward + backward at B in {224, 384, 1152, 8192},
D = 512, P = 4 samples per class (the official layout, so the official code can run)."""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, Optional

import torch

from ._core import Case, Impl, Spec

CORE = "smooth_ap"
D, P, TAU = 512, 4, 0.01


def _official_bytes(B: int) -> float:
    # the official graph keeps about six B^3 float32 tensors alive (repeat, permuted difference,
    # sigmoid, mask, product, and their autograd buffers)
    return 6.0 * 4 * B ** 3


def _case(B: int, quick: bool = True) -> Case:
    C = B // P

    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv
        from ..reference.smooth_ap import loop_smooth_ap, official_smooth_ap

        g = torch.Generator().manual_seed(B)
        x0 = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(device)
        labels = torch.arange(C, device=device).repeat_interleave(P)
        mem = (torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 20 * 2 ** 30)

        def fwd_bwd(fn):
            def run():
                x = x0.clone().requires_grad_()
                loss = fn(x)
                loss.backward()
                return loss.detach().reshape(()).float().cpu(), x.grad.float().cpu()
            return run

        impls = []
        if _official_bytes(B) < 0.8 * mem:
            impls.append(Impl("official", "reference", fwd_bwd(lambda x: official_smooth_ap(x, C, TAU)),
                              "Andrew-Brown1/Smooth_AP, B^3 tensors"))
        if B <= (1152 if device == "cpu" else 2048):
            impls.append(Impl("loop", "baseline", fwd_bwd(lambda x: loop_smooth_ap(x, labels, TAU)),
                              "per-query PyTorch loop, autograd"))
        impls.append(Impl("pyeccv", "pyeccv", fwd_bwd(lambda x: pyeccv.smooth_ap_loss(x, labels, temperature=TAU)),
                          "C++ / Triton ranks + analytic gradient"))
        if importlib.util.find_spec("pytorch_metric_learning") is not None and _official_bytes(B) < 0.8 * mem:
            from pytorch_metric_learning import losses

            pml = losses.SmoothAPLoss(temperature=TAU)
            impls.append(Impl("pytorch-metric-learning", "peer", fwd_bwd(lambda x: pml(x, labels)),
                              "losses.SmoothAPLoss (B^3; groups classes by position)"))

        def check(outs: Dict[str, Any]) -> Dict[str, str]:
            ref = outs.get("official", outs.get("loop"))
            if ref is None:
                return {}
            st = {}
            for k, (loss, grad) in outs.items():
                el = float((loss - ref[0]).abs() / ref[0].abs().clamp_min(1e-12))
                eg = float((grad - ref[1]).norm() / ref[1].norm().clamp_min(1e-12))
                st[k] = "ok" if el <= 1e-4 and eg <= 1e-3 else f"MISMATCH loss {el:.1e} grad {eg:.1e}"
            return st

        # floor: read X, write S, read it back for the ranks, write dS, read it twice for dX
        nbytes = 4.0 * (2 * B * D + 5 * B * B)
        return Spec(impls, bytes=nbytes, flops=8.0 * B * B * D + 3 * 12.0 * B * P * B, check=check,
                    params=dict(B=B, D=D, P=P, tau=TAU))

    return Case(CORE, f"fwd+bwd-B{B}", build, quick=quick)


CASES = [_case(224), _case(384), _case(1152), _case(8192, quick=False)]
