"""Benchmark cases of the volume-rendering core (NeRF compositing): forward + backward of
rgb, opacity and depth w.r.t. densities and colours, on dense batches (65536 x 64, 65536 x 192,
262144 x 64 rays x samples) and on a ragged batch of 2^18 samples with ray lengths 0..512.

Implementations, on the same float32 samples:
- dense PyTorch (the reference): alpha = 1 - exp(-sigma dt), T = exp(-exclusive cumsum), autograd;
  on the ragged batch it runs on the rays padded to 512 samples (zero density), as a dense user does;
- packed PyTorch (baseline): nerfacc's formulation in torch ops (global cumsum, index_add_);
- pyeccv: `pyeccv.volume_render` (C++ on CPU, Triton on GPU);
- nerfacc (peer, GPU only: its CPU path raises): `nerfacc.rendering` with the samples given.
Floor: each sample's density, interval and colour read by the forward and again by the backward
(24 B), and its two gradients written (16 B): 64 B a sample in float32.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, Optional

import torch

from ._core import Case, Impl, Spec

CORE = "volume_render"
BYTES_PER_SAMPLE = 64.0
FLOPS_PER_SAMPLE = 40.0


def _dense_inputs(R: int, S: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    sig = torch.rand(R, S, generator=g) * 4.0
    rgb = torch.rand(R, S, 3, generator=g)
    t = torch.sort(torch.rand(R, S + 1, generator=g) * 4.0 + 2.0, -1).values
    return [x.to(device) for x in (sig, rgb, t[:, :-1].contiguous(), t[:, 1:].contiguous())]


def _grads(R: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return [x.to(device) for x in (torch.randn(R, 3, generator=g), torch.randn(R, generator=g),
                                   torch.randn(R, generator=g))]


def _fwd_bwd(fn, leaves, grads):
    """One forward + backward; returns the outputs and the gradients (float32, on the CPU)."""
    def run():
        xs = [x.detach().requires_grad_() for x in leaves]
        outs = fn(*xs)
        torch.autograd.backward(list(outs[:3]), grads)
        return [o.detach().float().cpu() for o in outs[:3]] + [x.grad.float().cpu() for x in xs]
    return run


def _check(ref_name: str, unpad=None):
    def check(outs: Dict[str, Any]) -> Dict[str, str]:
        ref = outs.get(ref_name)
        if ref is None:
            return {}
        if unpad is not None:
            ref = unpad(ref)
        st = {}
        for k, out in outs.items():
            if k == ref_name:
                st[k] = "ok"
                continue
            worst = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(out, ref))
            st[k] = "ok" if worst <= 1e-4 else f"MISMATCH rel {worst:.1e}"
        return st
    return check


def _nerfacc_impl(device, sig, rgb, ts, te, pi, grads, R):
    if device != "cuda" or importlib.util.find_spec("nerfacc") is None or os.environ.get("PYECCV_BENCH_NO_NERFACC"):
        return None
    import nerfacc

    ray = torch.repeat_interleave(torch.arange(R, device=device), pi[:, 1])

    def fn(s, c):
        colors, opac, depth, _ = nerfacc.rendering(ts, te, ray, n_rays=R, rgb_sigma_fn=lambda t0, t1, ri: (c, s))
        return colors, opac.reshape(R), depth.reshape(R)
    return Impl("nerfacc", "peer", _fwd_bwd(fn, [sig, rgb], grads), "nerfacc 0.5 rendering(): scans + index_add_")


def _impls(device, dense, packed, pi, grads, R, dense_note):
    """The implementations on one batch: dense = (sig, rgb, ts, te) (R, S[, 3]), packed = the same
    samples flat (N,[, 3])."""
    import pyeccv
    from ..reference.volume_render import dense_render, packed_render_vectorized

    sig, rgb, ts, te = dense
    fs, frgb, fts, fte = packed
    impls = [
        Impl("dense-torch", "reference", _fwd_bwd(lambda s, c: dense_render(s, c, ts, te), [sig, rgb], grads),
             dense_note),
        Impl("packed-torch", "baseline",
             _fwd_bwd(lambda s, c: packed_render_vectorized(s, c, fts, fte, pi), [fs, frgb], grads),
             "global cumsum + index_add_ (nerfacc's formulation in torch)"),
        Impl("pyeccv", "pyeccv", _fwd_bwd(lambda s, c: pyeccv.volume_render(s, c, fts, fte, pi), [fs, frgb], grads),
             "C++ / Triton, one pass per ray, recomputing backward"),
    ]
    peer = _nerfacc_impl(device, fs, frgb, fts, fte, pi, grads, R)
    return impls + ([peer] if peer is not None else [])


def _dense_case(R: int, S: int, quick: bool = True) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        sig, rgb, ts, te = _dense_inputs(R, S, device, R + S)
        grads = _grads(R, device, R + S)
        pi = torch.stack([torch.arange(R, device=device) * S, torch.full((R,), S, device=device)], 1)
        fs, fts, fte = sig.reshape(-1), ts.reshape(-1), te.reshape(-1)
        frgb = rgb.reshape(-1, 3)
        impls = _impls(device, (sig, rgb, ts, te), (fs, frgb, fts, fte), pi, grads, R,
                       "exp / cumsum / sum with autograd (vanilla NeRF's compositing)")

        def flat_ref(out):  # dense grads (R, S) -> packed (N,)
            return out[:3] + [out[3].reshape(-1), out[4].reshape(-1, 3)]

        def check(outs):
            outs = {k: (flat_ref(v) if k == "dense-torch" else v) for k, v in outs.items()}
            return _check("dense-torch")(outs)
        N = R * S
        return Spec(impls, bytes=BYTES_PER_SAMPLE * N, flops=FLOPS_PER_SAMPLE * N, check=check,
                    params=dict(rays=R, samples=S, N=N))

    return Case(CORE, f"fwd+bwd-{R}x{S}", build, quick=quick)


def _ragged_case(total: int = 2 ** 18, longest: int = 512, quick: bool = True) -> Case:
    def build(device: str, quick_run: bool) -> Optional[Spec]:
        g = torch.Generator().manual_seed(total)
        counts = []
        while sum(counts) < total:
            counts.append(int(torch.randint(0, longest + 1, (1,), generator=g)))
        counts[-1] -= sum(counts) - total
        R = len(counts)
        count = torch.tensor(counts)
        start = torch.cumsum(count, 0) - count
        sig, rgb, ts, te = _dense_inputs(R, longest, "cpu", total)
        keep = torch.arange(longest)[None, :] < count[:, None]  # (R, longest) mask of real samples
        sig = sig * keep  # padding: zero density (contributes nothing), as a dense user pads
        pi = torch.stack([start, count], 1).to(device)
        fs, frgb, fts, fte = (x[keep].contiguous().to(device) for x in (sig, rgb, ts, te))
        sig, rgb, ts, te, keep = (x.to(device) for x in (sig, rgb, ts, te, keep))
        grads = _grads(R, device, total)
        impls = _impls(device, (sig, rgb, ts, te), (fs, frgb, fts, fte), pi, grads, R,
                       f"padded to {longest} samples, autograd")
        kcpu = keep.cpu()

        def check(outs):
            outs = {k: (v[:3] + [v[3][kcpu], v[4][kcpu]] if k == "dense-torch" else v) for k, v in outs.items()}
            return _check("dense-torch")(outs)
        return Spec(impls, bytes=BYTES_PER_SAMPLE * total, flops=FLOPS_PER_SAMPLE * total, check=check,
                    params=dict(rays=R, samples=f"0..{longest}", N=total))

    return Case(CORE, f"fwd+bwd-ragged{total}", build, quick=quick)


CASES = [_dense_case(65536, 64), _dense_case(65536, 192), _dense_case(262144, 64, quick=False), _ragged_case()]
