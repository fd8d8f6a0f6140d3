"""Benchmark cases of the Gradient Centralization core: one optimizer step over ResNet-50's
parameter shapes (25.6 M parameters) and, on GPU, a 1 B-parameter transformer-shaped set.

Each implementation owns its copy of the parameters, gradients and state (ResNet-50), and the
check compares pyeccv's first step with the official optimizer's. torch's own optimizers run
without GC: they are the speed peers (the target is GC at the cost of torch's fused AdamW).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ._core import Case, Impl, Spec

CORE = "grad_central"


def resnet50_shapes() -> List[Tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet50 (25,557,032 parameters)."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, cin, 1, 1), (width * 4,), (width * 4,)]
            cin = width * 4
    return shapes + [(1000, 2048), (1000,)]


def transformer_shapes(d: int = 2048, layers: int = 20, vocab: int = 32000) -> List[Tuple[int, ...]]:
    """A GPT-style stack: about 1.07 B parameters at the defaults."""
    shapes: List[Tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def _params(shapes, device, seed, grads=True):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(*s, generator=g) * 0.02).to(device))
        if grads:
            p.grad = (torch.randn(*s, generator=g) * 1e-3).to(device)
        ps.append(p)
    return ps


def _case(name: str, shapes_fn, opt: str, quick: bool = True, devices=("cpu", "cuda"), share: bool = False) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv.optim as O
        from ..reference import grad_central as ref

        shapes = shapes_fn()
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        shared = _params(shapes, device, 0) if share else None

        def make(factory):
            ps = shared if share else _params(shapes, device, 0)
            o = factory(ps)
            calls = [0]

            def step():
                o.step()
                calls[0] += 1
                if calls[0] == 1 and not share:  # the first (warm-up) step is what the check compares
                    return [p.detach().clone() for p in ps]
                return None
            return step

        if opt == "adam":
            impls = [
                Impl("official Adam_GC", "reference", make(lambda ps: ref.Adam_GC(ps, lr=1e-3, weight_decay=1e-4)),
                     "Yonghongwei/Gradient-Centralization, a Python loop"),
                Impl("pyeccv Adam(gc)", "pyeccv", make(lambda ps: O.Adam(ps, lr=1e-3, weight_decay=1e-4)),
                     "fused GC + Adam, one call"),
                Impl("torch AdamW foreach (no GC)", "peer",
                     make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-4, foreach=True))),
                Impl("torch AdamW fused (no GC)", "peer",
                     make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-4, fused=True))),
            ]
            per_param_bytes = 7  # read p, g, m, v; write p, m, v
        else:
            impls = [
                Impl("official SGD_GC", "reference",
                     make(lambda ps: ref.SGD_GC(ps, lr=0.1, momentum=0.9, weight_decay=1e-4))),
                Impl("pyeccv SGD(gc)", "pyeccv", make(lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4))),
                Impl("torch SGD foreach (no GC)", "peer",
                     make(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True))),
                Impl("torch SGD fused (no GC)", "peer",
                     make(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True))),
            ]
            per_param_bytes = 5  # read p, g, buf; write p, buf

        def check(outs: Dict[str, Any]) -> Dict[str, str]:
            ref_out = outs.get(impls[0].name)
            mine = outs.get(impls[1].name)
            if ref_out is None or mine is None:
                return {}
            # one step each (the warm-up) from the same parameters and gradients
            err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(mine, ref_out))
            st = {impls[0].name: "ok", impls[1].name: "ok" if err < 1e-4 else f"MISMATCH (rel {err:.1e})"}
            for i in impls[2:]:
                st[i.name] = "no GC"
            return st

        return Spec(impls, bytes=float(per_param_bytes * 4 * numel), check=None if share else check,
                    params=dict(params=numel, tensors=len(shapes), optimizer=opt))

    return Case(CORE, name, build, quick=quick, devices=devices)


CASES = [
    _case("adam-resnet50", resnet50_shapes, "adam"),
    _case("sgd-resnet50", resnet50_shapes, "sgd"),
    _case("adam-transformer-1B", transformer_shapes, "adam", quick=False, devices=("cuda",), share=True),
]
