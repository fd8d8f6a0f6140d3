"""Calls every CUDA kernel of pyeccv once at small sizes, and checks the answers.

Run under `compute-sanitizer --tool memcheck` by benchmarks/device_check.sh; with --dry-run (no
GPU) it only checks that the calls it would make exist.
"""
import os
import sys

import torch

DRY = "--dry-run" in sys.argv or not torch.cuda.is_available()


def lsap():
    import numpy as np
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    import pyeccv

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for (B, N, M) in [(3, 5, 7), (2, 7, 5), (1, 1, 1), (4, 33, 65)]:
            cost = torch.rand(B, N, M, generator=g, dtype=dtype)
            got = pyeccv.batch_linear_sum_assignment(cost.cuda(), num_cols=[M] * (B - 1) + [M - 1]).cpu()
            for b in range(B):
                nc = M if b < B - 1 else M - 1
                r, c = scipy_lsa(cost[b, :, :nc].double().numpy())
                rows = np.flatnonzero(got[b].numpy() >= 0)
                assert np.isclose(cost[b].double().numpy()[rows, got[b].numpy()[rows]].sum(),
                                  cost[b, :, :nc].double().numpy()[r, c].sum()), ("lsap", dtype, B, N, M, b)
    for team in ("warp", "block"):  # both teams, state in shared and in global memory
        for force in ("1", "0"):
            os.environ["PYECCV_LSAP_TEAM"] = team
            os.environ["PYECCV_LSAP_GLOBAL_STATE"] = force
            pyeccv.batch_linear_sum_assignment(torch.rand(5, 17, 9, generator=g).cuda())
    os.environ.pop("PYECCV_LSAP_GLOBAL_STATE")
    os.environ.pop("PYECCV_LSAP_TEAM")
    bad = torch.rand(2, 4, 4, generator=g).cuda()
    bad[1, 0, 0] = float("nan")
    try:
        pyeccv.batch_linear_sum_assignment(bad)
        raise AssertionError("NaN not reported")
    except ValueError:
        pass


def detr_cost():
    import pyeccv
    from pyeccv.reference.hungarian import padded_cost

    g = torch.Generator().manual_seed(1)
    for focal in (False, True):
        logits = torch.randn(2, 33, 7, generator=g)
        boxes = torch.rand(2, 33, 4, generator=g) * 0.5 + 0.2
        labels = torch.randint(0, 7, (5,), generator=g)
        tboxes = torch.rand(5, 4, generator=g) * 0.5 + 0.2
        got = pyeccv.detr_match_cost(logits.cuda(), boxes.cuda(), labels.cuda(), tboxes.cuda(), [5, 0],
                                     focal=focal).cpu()
        want = padded_cost(logits, boxes, labels, tboxes, [5, 0], focal=focal)
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got)) and torch.allclose(got[fin], want[fin], atol=1e-5), "detr_cost"


def smooth_ap():
    import pyeccv
    from pyeccv.reference.smooth_ap import loop_smooth_ap

    g = torch.Generator().manual_seed(2)
    for formulation in ("official", "paper"):
        x = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
        labels = torch.randint(0, 5, (37,), generator=g)
        xr = x.double().requires_grad_()
        want = loop_smooth_ap(xr, labels, 0.05, formulation)
        want.backward()
        xc = x.cuda().requires_grad_()
        got = pyeccv.smooth_ap_loss(xc, labels.cuda(), temperature=0.05, formulation=formulation)
        got.backward()
        assert abs(float(got) - float(want)) < 1e-4, "smooth_ap loss"
        assert torch.allclose(xc.grad.cpu().double(), xr.grad, atol=1e-4), "smooth_ap grad"


def grad_central():
    import pyeccv.optim as O
    from pyeccv.reference.grad_central import Adam_GC, SGD_GC

    for ref_cls, ours in ((Adam_GC, lambda ps: O.Adam(ps, lr=1e-2, weight_decay=1e-3)),
                          (SGD_GC, lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3))):
        g = torch.Generator().manual_seed(3)
        shapes = [(5, 3, 3, 3), (7, 4), (9,), (1, 1), (0, 3)]
        base = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        a = [torch.nn.Parameter(b.clone()) for b in base]
        c = [torch.nn.Parameter(b.clone().cuda()) for b in base]
        oa, oc = (ref_cls(a, lr=1e-2 if ref_cls is Adam_GC else 0.1, weight_decay=1e-3, **(
            {} if ref_cls is Adam_GC else {"momentum": 0.9})), ours(c))
        for _ in range(3):
            for p, q, gr in zip(a, c, grads):
                p.grad, q.grad = gr.clone(), gr.clone().cuda()
            oa.step()
            oc.step()
        for p, q in zip(a, c):
            assert torch.allclose(p, q.cpu(), rtol=1e-8, atol=1e-10), "grad_central"


def volume_render():
    import pyeccv
    from pyeccv.reference.volume_render import packed_render

    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([0, 1, 5, 1030, 3, 0, 64, 2])  # ragged, one ray longer than a block
    start = torch.cumsum(counts, 0) - counts
    pi = torch.stack([start, counts], 1)
    N = int(counts.sum())
    sig = torch.rand(N, generator=g, dtype=torch.float64) * 3
    sig[::7] = 0.0
    sig[5] = 1e6
    rgb = torch.rand(N, 3, generator=g, dtype=torch.float64)
    ts = torch.rand(N, generator=g, dtype=torch.float64)
    te = ts + torch.rand(N, generator=g, dtype=torch.float64) * 0.1
    bg = torch.rand(3, generator=g, dtype=torch.float64)
    for eps in (0.0, 1e-2):
        sr, cr, br = (x.clone().requires_grad_() for x in (sig, rgb, bg))
        want = packed_render(sr, cr, ts, te, pi, br, early_stop_eps=eps)
        sum(o.sum() for o in want[:3]).backward()
        for dt in (torch.float32, torch.float64):
            sc, cc, bc = (x.to(dt).cuda().requires_grad_() for x in (sig, rgb, bg))
            got = pyeccv.volume_render(sc, cc, ts.to(dt).cuda(), te.to(dt).cuda(), pi.cuda(), background=bc,
                                       early_stop_eps=eps, return_weights=True)
            sum(o.sum() for o in got[:3]).backward()
            tol = 1e-4 if dt == torch.float32 else 1e-10
            for a, b in zip(got, want):
                assert torch.allclose(a.cpu().double(), b.detach(), atol=tol), "volume_render forward"
            for a, b in ((sc, sr), (cc, cr), (bc, br)):
                assert torch.allclose(a.grad.cpu().double(), b.grad, atol=tol * 10), "volume_render backward"
        w = pyeccv.render_weights(sig.float().cuda(), ts.float().cuda(), te.float().cuda(), pi.cuda(),
                                  early_stop_eps=eps)[0]
        assert torch.allclose(w.cpu().double(), want[3], atol=1e-4), "render_weights"


def cond_mask_head():
    import pyeccv
    from pyeccv.reference.cond_mask_head import cond_mask_head as official

    g = torch.Generator().manual_seed(5)
    N, C, H, W, I = 3, 8, 13, 37, 29  # odd sizes, one image without instances
    feats = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    params = torch.randn(I, pyeccv.num_gen_params(C), generator=g, dtype=torch.float64) * 0.5
    im_inds = torch.randint(0, N - 1, (I,), generator=g)
    locations = torch.rand(I, 2, generator=g) * 300
    soi = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0])[torch.randint(0, 5, (I,), generator=g)]
    grad = torch.randn(I, H, W, generator=g, dtype=torch.float64)
    fr, pr = feats.clone().requires_grad_(), params.clone().requires_grad_()
    official(fr, pr, im_inds, locations, soi).backward(grad)
    for dt in (torch.float32, torch.float64):
        for det in (True, False):
            fc, pc = (x.to(dt).cuda().requires_grad_() for x in (feats, params))
            out = pyeccv.cond_mask_head(fc, pc, im_inds.cuda(), locations.cuda(), soi.cuda(), deterministic=det)
            out.backward(grad.to(dt).cuda())
            want = official(feats, params, im_inds, locations, soi)
            tol = 1e-4 if dt == torch.float32 else 1e-10
            assert torch.allclose(out.cpu().double(), want, atol=tol, rtol=tol), "cond_mask_head forward"
            assert torch.allclose(fc.grad.cpu().double(), fr.grad, atol=tol * 10, rtol=tol * 10), "cond_mask_head d_feats"
            assert torch.allclose(pc.grad.cpu().double(), pr.grad, atol=tol * 100, rtol=tol * 10), "cond_mask_head d_params"


def dyn_group_conv():
    import pyeccv
    from pyeccv.reference.dyn_group_conv import masked_dyn_group_conv2d as official

    g = torch.Generator().manual_seed(6)
    for (B, C, Co, H, W, k, heads, keep, st, pad) in [(3, 37, 24, 13, 11, 3, 4, 9, 1, 1), (2, 20, 12, 9, 10, 3, 2, 7, 2, 1),
                                                      (1, 16, 8, 5, 5, 1, 4, 16, 1, 0)]:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        w = torch.randn(Co, C, k, k, generator=g, dtype=torch.float64)
        s = (torch.rand(B, heads, C, generator=g, dtype=torch.float64) * 4).round() / 4  # ties
        xr, wr, sr = (t.clone().requires_grad_() for t in (x, w, s))
        want = official(xr, wr, sr, keep, st, pad, 1)
        grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
        want.backward(grad)
        for dt, tol in ((torch.float64, 1e-9), (torch.float32, 2e-2), (torch.bfloat16, 5e-2)):  # fp32: tf32 dots
            xc, wc, sc = (t.to(dt).cuda().requires_grad_() for t in (x, w, s))
            out = pyeccv.dyn_group_conv2d(xc, wc, sc, keep=keep, stride=st, padding=pad)
            out.backward(grad.to(dt).cuda())
            for name, a, b in (("out", out, want), ("d_x", xc.grad, xr.grad), ("d_w", wc.grad, wr.grad),
                               ("d_s", sc.grad, sr.grad)):
                err = float((a.detach().cpu().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-12))
                assert err <= tol, f"dyn_group_conv {name} {dt}: relative error {err:.2e}"


CHECKS = [lsap, detr_cost, smooth_ap, grad_central, volume_render, cond_mask_head, dyn_group_conv]

if __name__ == "__main__":
    for fn in CHECKS:
        if DRY:
            print(f"[dry-run] would call {fn.__name__}")
            continue
        fn()
        torch.cuda.synchronize()
        print(f"ok {fn.__name__}")
