"""Benchmark cases of the Hungarian matching core (DETR).

Matcher cases time the whole DETR matching step (cost + assignment + indices on the host):
the official matcher (cost over the whole batch, SciPy per image) against pyeccv's
HungarianMatcher, and peers solving pyeccv's padded cost. Assignment cases time batched
linear assignment alone: the SciPy loop against pyeccv and the peers.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ._core import Case, Impl, Spec

CORE = "hungarian"


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- inputs --------------------------------------------------------------------------------------
def detr_inputs(B: int, Q: int, K: int, tmax: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K, generator=g)
    boxes = torch.rand(B, Q, 4, generator=g) * 0.6 + 0.2
    counts = torch.randint(1, tmax + 1, (B,), generator=g)
    counts[0] = tmax  # the padded width is reached
    targets = [{"labels": torch.randint(0, K - 1, (int(n),), generator=g).to(device),
                "boxes": (torch.rand(int(n), 4, generator=g) * 0.6 + 0.2).to(device)} for n in counts]
    return {"pred_logits": logits.to(device), "pred_boxes": boxes.to(device)}, targets


def _matched_cost(cost_full: torch.Tensor, sizes: List[int], indices) -> float:
    """Total of the official (B, Q, sum T) cost over a matching given per image."""
    total, start = 0.0, 0
    for b, (i, j) in enumerate(indices):
        total += float(cost_full[b, i.long(), start + j.long()].double().sum())
        start += sizes[b]
    return total


# ---- matcher cases -----------------------------------------------------------------------------
def _matcher_case(name: str, B: int, Q: int, tmax: int, focal: bool, quick: bool = True) -> Case:
    K = 91 if focal else 92  # COCO classes (+ no-object for DETR's softmax)

    def build(device: str, quick_run: bool) -> Optional[Spec]:
        from ..nn import HungarianMatcher
        from ..ops.hungarian import detr_match_cost
        from ..reference.hungarian import detr_cost, detr_matcher

        outputs, targets = detr_inputs(B, Q, K, tmax, device)
        w = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0) if focal else dict(cost_class=1.0, cost_bbox=5.0,
                                                                                   cost_giou=2.0)
        matcher = HungarianMatcher(**w, focal=focal)
        sizes = [len(t["labels"]) for t in targets]
        labels = torch.cat([t["labels"] for t in targets])
        tboxes = torch.cat([t["boxes"] for t in targets])

        impls = [
            Impl("official", "reference", lambda: detr_matcher(outputs, targets, **w, focal=focal),
                 "cost over the whole batch, SciPy per image"),
            Impl("pyeccv", "pyeccv", lambda: matcher(outputs, targets), "fused cost + batched exact LSAP"),
        ]

        def padded_cost():
            c = detr_match_cost(outputs["pred_logits"], outputs["pred_boxes"], labels, tboxes, sizes, **w,
                                focal=focal)
            return torch.nan_to_num(c, posinf=1e6)  # peers take no +inf; constant padding keeps the optimum

        if device == "cuda" and _has("torch_linear_assignment"):
            import torch_linear_assignment as tla

            def run_tla():
                col = tla.batch_linear_assignment(padded_cost()).cpu()
                return [(torch.nonzero((c >= 0) & (c < n)).flatten(), c[(c >= 0) & (c < n)]) for c, n in
                        zip(col, sizes)]

            impls.append(Impl("torch-linear-assignment", "peer", run_tla, "pyeccv cost + tla (Triton)"))
        if _has("lap"):
            import lap

            def run_lapx():
                c = padded_cost().cpu().numpy()
                out = []
                for b, n in enumerate(sizes):
                    _, r, cc = lap.lapjvx(c[b, :, :n], extend_cost=True)
                    order = np.argsort(r)
                    out.append((torch.from_numpy(r[order].astype(np.int64)),
                                torch.from_numpy(cc[order].astype(np.int64))))
                return out

            impls.append(Impl("lapx", "peer", run_lapx, "pyeccv cost + lapx lapjvx per image"))

        def check(outs: Dict[str, Any]) -> Dict[str, str]:
            full = detr_cost(outputs["pred_logits"], outputs["pred_boxes"], labels, tboxes, **w, focal=focal).cpu()
            ref = outs.get("official")
            if ref is None:
                return {}
            want = _matched_cost(full, sizes, ref)
            st = {}
            for k, v in outs.items():
                same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(v, ref))
                got = _matched_cost(full, sizes, v)
                st[k] = "ok" if same else ("ok (ties)" if abs(got - want) <= 1e-5 * max(1.0, abs(want))
                                           else f"MISMATCH total {got:.6g} vs {want:.6g}")
            return st

        nbytes = 4 * (B * Q * K + B * Q * 4 + sum(sizes) * 5 + B * Q * tmax)
        return Spec(impls, bytes=nbytes, check=check, params=dict(B=B, Q=Q, K=K, tmax=tmax, focal=focal))

    return Case(CORE, name, build, quick=quick)


# ---- assignment cases ----------------------------------------------------------------------------
def _lsap_case(name: str, B: int, N: int, M: int, quick: bool = True, single: bool = False) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        import pyeccv
        from ..reference.hungarian import scipy_batch

        g = torch.Generator().manual_seed(1)
        cost = torch.rand(B, N, M, generator=g).to(device)
        cost_np = cost.cpu().numpy()

        if single:
            from scipy.optimize import linear_sum_assignment as scipy_lsa

            c2 = cost[0] if device == "cuda" else cost_np[0]  # NumPy in, NumPy out on the CPU
            impls = [Impl("scipy", "reference", lambda: scipy_lsa(cost_np[0])),
                     Impl("pyeccv", "pyeccv", lambda: pyeccv.linear_sum_assignment(c2))]
        else:
            impls = [Impl("scipy", "reference", lambda: scipy_batch(cost), "loop over the batch"),
                     Impl("pyeccv", "pyeccv", lambda: pyeccv.batch_linear_sum_assignment(cost))]
        if device == "cuda" and _has("torch_linear_assignment"):
            import torch_linear_assignment as tla

            impls.append(Impl("torch-linear-assignment", "peer", lambda: tla.batch_linear_assignment(cost)))
        if _has("lap"):
            import lap

            if single:
                impls.append(Impl("lapx", "peer", lambda: lap.lapjvx(cost_np[0], extend_cost=True)[1:],
                                  "lapjvx"))
            else:
                impls.append(Impl("lapx", "peer", lambda: lap.lapjvx_batch(cost.cpu().numpy(), extend_cost=True,
                                                                           n_threads=torch.get_num_threads()),
                                  "lapjvx_batch, all threads"))

        def totals(name: str, out) -> np.ndarray:
            if name == "lapx" and not single:
                _, rows, cols = out
                return np.array([cost_np[b][r, c].astype(np.float64).sum() for b, (r, c) in
                                 enumerate(zip(rows, cols))])
            if single:
                r, c = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in out[-2:])
                return np.array([cost_np[0][r, c].astype(np.float64).sum()])
            col = out.cpu().numpy()
            return np.array([cost_np[b][np.nonzero(col[b] >= 0)[0], col[b][col[b] >= 0]].astype(np.float64).sum()
                             for b in range(B)])

        def check(outs: Dict[str, Any]) -> Dict[str, str]:
            if "scipy" not in outs:
                return {}
            want = totals("scipy", outs["scipy"])
            st = {}
            for k, v in outs.items():
                got = totals(k, v)
                err = np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))) if len(want) else 0.0
                st[k] = "ok" if err <= 1e-9 else f"MISMATCH (rel {err:.2g})"
            return st

        return Spec(impls, bytes=4.0 * B * N * M, check=check, params=dict(B=B, N=N, M=M))

    return Case(CORE, name, build, quick=quick)


CASES = [
    _matcher_case("detr-64x100x20", 64, 100, 20, focal=False),
    _matcher_case("deformable-32x300x50", 32, 300, 50, focal=True),
    _matcher_case("dino-16x900x100", 16, 900, 100, focal=True),
    _lsap_case("lsap-64x100x20", 64, 100, 20),
    _lsap_case("lsap-16x900x100", 16, 900, 100),
    _lsap_case("lsap-208x300x100", 208, 300, 100),
    _lsap_case("lsap-8x1000x1000", 8, 1000, 1000),
    _lsap_case("lsap-1x16x16", 1, 16, 16, single=True),
    _lsap_case("lsap-1x1000x1000", 1, 1000, 1000, single=True),
    _lsap_case("lsap-1x2000x2000", 1, 2000, 2000, single=True),
]
