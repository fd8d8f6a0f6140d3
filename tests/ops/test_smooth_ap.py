"""Smooth-AP: against the official B^3 code at official layouts and the per-query loop for any
labels; analytic gradients against autograd (gradcheck, float64); Triton under the interpreter."""
import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.ops.smooth_ap import smooth_ap_fwd
from pyeccv.reference.smooth_ap import loop_ap, loop_smooth_ap, official_smooth_ap


def normed(B, D, g, dtype=torch.float64, device="cpu"):
    return torch.nn.functional.normalize(testing.randn(B, D, g=g, dtype=torch.float64), dim=1).to(dtype=dtype,
                                                                                                 device=device)


def backends():
    out = ["native"]
    if testing.triton_device() is not None:
        out.append("triton")
    return out


def run(x, labels, backend, **kw):
    x = x.detach().clone().requires_grad_()
    dev = testing.triton_device() if backend == "triton" else "cpu"
    xd = x.detach().to(dev).requires_grad_()
    loss = pyeccv.smooth_ap_loss(xd, labels.to(dev), backend=backend, **kw)
    loss.backward()
    return loss.detach().cpu(), xd.grad.cpu()


LAYOUTS = [(1, 2), (2, 2), (3, 4), (5, 3), (8, 4), (16, 4), (4, 16), (13, 2)]  # (C classes, P samples)


@pytest.mark.parametrize("backend", backends())
def test_official_layouts_match_official_code(backend, g):
    for C, P in LAYOUTS:
        if backend == "triton" and C * P > 32:
            continue  # the interpreter is slow; the GPU run covers the larger batches
        tau = float(torch.empty(1).uniform_(0.005, 0.1, generator=g))
        x = normed(C * P, 7, g)
        labels = torch.arange(C).repeat_interleave(P)
        xo = x.clone().requires_grad_()
        want = official_smooth_ap(xo, C, tau)
        want.backward()
        got, grad = run(x, labels, backend, temperature=tau)
        testing.assert_close(got, want.detach()[0], "reduction", torch.float64, name=f"loss C={C} P={P}")
        if C == 1:  # one class: AP = 1 whatever X, the gradient is 0 (the official one is rounding noise)
            assert grad.abs().max() < 1e-12 and xo.grad.abs().max() < 1e-12
            continue
        testing.assert_close(grad, xo.grad, "reduction", torch.float64, name=f"grad C={C} P={P}")


def test_official_layout_float32_matches_official_code(g):
    """float32 in, float32 official graph: equal to float32 rounding (B up to 64)."""
    for C, P in [(16, 4), (8, 8), (32, 2)]:
        tau = float(torch.empty(1).uniform_(0.005, 0.1, generator=g))
        x = normed(C * P, 32, g, dtype=torch.float32)
        labels = torch.arange(C).repeat_interleave(P)
        xo = x.clone().requires_grad_()
        want = official_smooth_ap(xo, C, tau)
        want.backward()
        with testing.poisoned():
            got, grad = run(x, labels, "native", temperature=tau)
        testing.assert_close(got, want.detach()[0], "reduction", torch.float32)
        testing.assert_close(grad, xo.grad, "reduction", torch.float32)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_any_label_layout_matches_loop(backend, formulation, g):
    for B, n_labels in [(1, 1), (2, 2), (7, 3), (13, 5), (31, 4), (37, 37), (64, 9)]:
        if backend == "triton" and B > 31:
            continue
        labels = torch.randint(0, n_labels, (B,), generator=g)
        if formulation == "paper" and bool((torch.bincount(labels) >= 2).sum() == 0):
            labels[0] = labels[-1] if B > 1 else labels[0]
        x = normed(B, 5, g)
        xr = x.clone().requires_grad_()
        try:
            want = loop_smooth_ap(xr, labels, 0.03, formulation)
        except ValueError:
            with pytest.raises(ValueError, match="no valid query"):
                run(x, labels, backend, temperature=0.03, formulation=formulation)
            continue
        want.backward()
        got, grad = run(x, labels, backend, temperature=0.03, formulation=formulation)
        testing.assert_close(got, want.detach(), "reduction", torch.float64, name=f"loss B={B}")
        testing.assert_close(grad, xr.grad, "reduction", torch.float64, name=f"grad B={B}")


@pytest.mark.parametrize("backend", backends())
def test_queries_against_items(backend, g):
    """The op ranks any query rows against any item set (the distributed path uses this)."""
    dev = testing.triton_device() if backend == "triton" else "cpu"
    items = normed(23, 6, g)
    labels = torch.randint(0, 4, (23,), generator=g)
    qi = torch.tensor([3, 7, 8, 20, 22])
    for paper in (False, True):
        ap, valid, _ = smooth_ap_fwd(items[qi].to(dev), items.to(dev), labels.to(dev), qi.to(dev), 0.02, paper,
                                  backend)
        want, want_valid = loop_ap(items[qi], items, labels, qi, 0.02, "paper" if paper else "official")
        assert torch.equal(valid.cpu(), want_valid)
        testing.assert_close(ap.cpu()[want_valid], want[want_valid], "reduction", torch.float64)


@pytest.mark.parametrize("backend", backends())
def test_gradcheck(backend, g):
    dev = testing.triton_device() if backend == "triton" else "cpu"
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2]).to(dev)
    for formulation in ("official", "paper"):
        x = normed(7, 3, g).to(dev).requires_grad_()
        # a large temperature keeps the sigmoids in their smooth range for finite differences
        assert torch.autograd.gradcheck(
            lambda t: pyeccv.smooth_ap_loss(t, labels, temperature=0.3, formulation=formulation, backend=backend),
            (x,), eps=1e-6, atol=1e-7)


def test_clamped_sigmoid_region(g):
    """|S_ik - S_ij| / tau > 50: the official graph has zero slope there; so do we."""
    x = normed(12, 4, g) * 3.0
    labels = torch.arange(3).repeat_interleave(4)
    xo = x.clone().requires_grad_()
    want = official_smooth_ap(xo, 3, 0.005)
    want.backward()
    got, grad = run(x, labels, "native", temperature=0.005)
    testing.assert_close(got, want.detach()[0], "reduction", torch.float64)
    testing.assert_close(grad, xo.grad, "reduction", torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_embeddings(dtype, g):
    x = normed(24, 16, g, dtype=dtype)
    labels = torch.arange(6).repeat_interleave(4)
    xr = x.to(torch.float64).requires_grad_()
    want = loop_smooth_ap(xr, labels, 0.05)
    want.backward()
    xh = x.clone().requires_grad_()
    got = pyeccv.smooth_ap_loss(xh, labels, temperature=0.05)
    got.backward()
    assert got.dtype == torch.float32 and xh.grad.dtype == dtype
    testing.assert_close(got, want, "reduction", dtype)
    testing.assert_close(xh.grad, xr.grad, "reduction", dtype)


def test_bad_inputs():
    x = torch.randn(6, 4)
    labels = torch.arange(3).repeat_interleave(2)
    with pytest.raises(ValueError, match=r"labels must have one label per embedding \(6\), got 5"):
        pyeccv.smooth_ap_loss(x, labels[:5])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        pyeccv.smooth_ap_loss(x, labels.float())
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            pyeccv.smooth_ap_loss(x, labels, temperature=bad)
    with pytest.raises(ValueError, match=r"embeddings must have D > 0 features"):
        pyeccv.smooth_ap_loss(torch.randn(6, 0), labels)
    with pytest.raises(ValueError, match="embeddings must hold at least one sample"):
        pyeccv.smooth_ap_loss(torch.randn(0, 4), labels[:0])
    for v in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 1] = v
        with pytest.raises(ValueError, match="embeddings contains NaN or inf"):
            pyeccv.smooth_ap_loss(y, labels)
    with pytest.raises(ValueError, match="no valid query"):
        pyeccv.smooth_ap_loss(x, torch.arange(6), formulation="paper")
    with pytest.raises(ValueError, match="formulation must be one of"):
        pyeccv.smooth_ap_loss(x, labels, formulation="fast")
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        pyeccv.smooth_ap_loss(x[None], labels)
    with pytest.raises(ValueError, match="embeddings must have dtype in"):
        pyeccv.smooth_ap_loss(x.long(), labels)


def test_opcheck_and_compile(g):
    x = normed(10, 4, g, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3])
    qi = torch.arange(10)
    for paper in (False, True):
        testing.opcheck(torch.ops.pyeccv.smooth_ap_fwd.default, (x.requires_grad_(), x, labels, qi, 0.05, paper,
                                                                 "auto"))
        S = x.detach() @ x.detach().t()
        for items in (x.detach(), x.detach().clone()):  # one tensor (symmetric path) and two
            testing.opcheck(torch.ops.pyeccv.smooth_ap_bwd.default, (torch.rand(10), S, x.detach(), items, labels, qi,
                                                                     0.05, paper, "auto"), skip_autograd=True)

    def f(t, w, lab):  # a projection head and the loss, compiled as one graph; backward through it
        return pyeccv.smooth_ap_loss(torch.nn.functional.normalize(t @ w, dim=1), lab, temperature=0.05)

    w = testing.randn(4, 6, g=g).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(x.detach(), w, labels)
    (gc,) = torch.autograd.grad(loss_c, w)
    loss_e = f(x.detach(), w, labels)
    (ge,) = torch.autograd.grad(loss_e, w)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gc, ge)


def test_larger_batch_memory_is_quadratic(g):
    """B = 1152 with D = 512 (the official code would need tens of GB here)."""
    x = normed(1152, 512, g, dtype=torch.float32).requires_grad_()
    labels = torch.arange(288).repeat_interleave(4)
    loss = pyeccv.smooth_ap_loss(x, labels)
    loss.backward()
    assert torch.isfinite(x.grad).all() and 0 < float(loss.detach()) < 1
    # spot-check a few queries against the loop reference
    qi = torch.tensor([0, 577, 1151])
    want, _ = loop_ap(x.detach()[qi].double(), x.detach().double(), labels, qi, 0.01, "official")
    ap, _, _ = smooth_ap_fwd(x.detach()[qi], x.detach(), labels, qi, 0.01, False, "auto")
    testing.assert_close(ap, want, "reduction", torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_cuda_matches_cpu(formulation, g):
    for B, n_labels in [(24, 6), (384, 96), (1000, 37)]:
        x = normed(B, 64, g, dtype=torch.float32)
        labels = torch.randint(0, n_labels, (B,), generator=g)
        want, want_grad = run(x, labels, "native", formulation=formulation)
        xc = x.cuda().requires_grad_()
        got = pyeccv.smooth_ap_loss(xc, labels.cuda(), formulation=formulation)
        got.backward()
        testing.assert_close(got.cpu(), want, "reduction", torch.float32)
        testing.assert_close(xc.grad.cpu(), want_grad, "reduction", torch.float32)


@pytest.mark.cuda
def test_cuda_official_and_bf16(g):
    C, P = 96, 4
    x = normed(C * P, 512, g, dtype=torch.float32, device="cuda")
    labels = torch.arange(C, device="cuda").repeat_interleave(P)
    xo = x.clone().requires_grad_()
    want = official_smooth_ap(xo, C, 0.01)
    want.backward()
    xp = x.clone().requires_grad_()
    got = pyeccv.smooth_ap_loss(xp, labels)
    got.backward()
    testing.assert_close(got, want.detach()[0], "reduction", torch.float32)
    testing.assert_close(xp.grad, xo.grad, "reduction", torch.float32)
    xb = x.to(torch.bfloat16).requires_grad_()
    pyeccv.smooth_ap_loss(xb, labels).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    big = normed(8192, 512, g, dtype=torch.float32, device="cuda").requires_grad_()
    pyeccv.smooth_ap_loss(big, torch.arange(2048, device="cuda").repeat_interleave(4)).backward()
    assert torch.isfinite(big.grad).all()
