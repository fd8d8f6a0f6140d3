"""NeRF volume rendering on packed rays: against the per-ray loop (packed_render) on ragged batches
(empty and one-sample rays, rays out of order, unowned samples between them) and against the dense
PyTorch form; exact gradients where alpha = 1 or sigma = 0 (against a float64 loop that never
divides, and hand-derived values); early stopping; gradcheck; opcheck; torch.compile; bad inputs;
Triton under the interpreter; CUDA and nerfacc parity on a GPU."""
import math

import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.reference.volume_render import dense_render, packed_render, packed_render_weights

SIZES = (1, 2, 7, 97)
KINDS = ("density", "alpha")


backends = testing.backends
device_of = testing.device_of


# ---- inputs ---------------------------------------------------------------------------------------
def ragged(R, g, max_count=9, gaps=True, shuffle=True):
    """packed_info (R, 2) int64 and the sample count N. Counts include 0, 1 and max_count; rays are
    stored in a random order, with runs of samples that belong to no ray between them."""
    counts = torch.randint(0, max_count + 1, (R,), generator=g)
    special = [max_count, 0, 1]
    counts[:min(R, 3)] = torch.tensor(special[:min(R, 3)])
    order = torch.randperm(R, generator=g) if shuffle else torch.arange(R)
    pi = torch.zeros(R, 2, dtype=torch.int64)
    pos = 0
    for r in order.tolist():
        if gaps:
            pos += int(torch.randint(0, 3, (1,), generator=g))
        pi[r, 0], pi[r, 1] = pos, counts[r]
        pos += int(counts[r])
    if gaps:
        pos += int(torch.randint(0, 3, (1,), generator=g))
    return pi, pos


def owned_mask(pi, N):
    m = torch.zeros(N, dtype=torch.bool)
    for s, c in pi.tolist():
        m[s:s + c] = True
    return m


def samples(N, g, kind="density", sigma_high=10.0, dtype=torch.float64):
    """values (sigmas with ~20% exact zeros, or alphas in [0, 0.95)), rgbs, t_starts, t_ends
    (increasing; intervals in [0, 0.2), some of length 0)."""
    f64 = torch.float64
    if kind == "density":
        v = testing.rand(N, g=g, high=sigma_high, dtype=f64)
        v = torch.where(testing.rand(N, g=g, dtype=f64) < 0.2, torch.zeros_like(v), v)
    else:
        v = testing.rand(N, g=g, high=0.95, dtype=f64)
    ts = torch.cumsum(testing.rand(N, g=g, high=0.3, dtype=f64), 0)
    dt = testing.rand(N, g=g, high=0.2, dtype=f64)
    te = ts + torch.where(testing.rand(N, g=g, dtype=f64) < 0.1, torch.zeros_like(dt), dt)
    c = testing.rand(N, 3, g=g, dtype=f64)
    return tuple(x.to(dtype) for x in (v, c, ts, te))


def background(i, R, g, dtype=torch.float64):
    """Cycles through no background, a shared (3,) one and a per-ray (R, 3) one."""
    return (None, testing.rand(3, g=g, dtype=dtype), testing.rand(R, 3, g=g, dtype=dtype))[i % 3]


def cotangents(R, N, g):
    return testing.randn(R, 3, g=g, dtype=torch.float64), testing.randn(R, g=g, dtype=torch.float64), \
        testing.randn(R, g=g, dtype=torch.float64), testing.randn(N, g=g, dtype=torch.float64)


# ---- runners --------------------------------------------------------------------------------------
def _leaves(dev, *xs):
    return [None if x is None else x.detach().to(dev).requires_grad_() for x in xs]


def _grads(outs, cot, leaves):
    loss = sum((o.to(torch.float64) * k.to(o.device)).sum() for o, k in zip(outs, cot))
    present = [x for x in leaves if x is not None]
    got = iter(torch.autograd.grad(loss, present, allow_unused=True))
    out = []
    for x in leaves:
        if x is not None:
            d = next(got)
            x = (torch.zeros_like(x) if d is None else d).cpu()
        out.append(x)
    return out


def run_op(kind, backend, v, c, ts, te, pi, bg=None, eps=0.0, cot=None):
    """The public op with return_weights; (rgb, opacity, depth, weights) and the VJP of cot w.r.t.
    (values, rgbs, background), all on the CPU."""
    dev = device_of(backend)
    lv, lc, lb = _leaves(dev, v, c, bg)
    fn = pyeccv.volume_render if kind == "density" else pyeccv.volume_render_alpha
    mv = lambda x: None if x is None else x.to(dev)  # noqa: E731
    outs = fn(lv, lc, mv(ts), mv(te), pi.to(dev), background=lb, early_stop_eps=eps, return_weights=True,
              backend=backend)
    grads = _grads(outs, cot, [lv, lc, lb]) if cot is not None else None
    return [o.detach().cpu() for o in outs], grads


def run_ref(kind, v, c, ts, te, pi, bg=None, eps=0.0, cot=None):
    """packed_render in float64 (on the values the op saw) and its autograd VJP."""
    f64 = lambda x: None if x is None else x.detach().to(torch.float64)  # noqa: E731
    lv, lc, lb = _leaves("cpu", f64(v), f64(c), f64(bg))
    outs = packed_render(lv, lc, f64(ts), f64(te), pi, lb, is_alpha=kind == "alpha", early_stop_eps=eps)
    grads = _grads(outs, cot, [lv, lc, lb]) if cot is not None else None
    return [o.detach() for o in outs], grads


def loop_render(values, rgbs, ts, te, pi, bg=None, *, is_alpha=False, eps=0.0):
    """float64 per-ray loop, exact where alpha = 1 or sigma = 0: T from a shifted cumsum (no
    cumsum - tau cancellation at huge sigma) or a running product (no cumprod division by 1 - alpha).
    Returns rgb, opacity, depth, weights, transmittance, alphas."""
    N = values.shape[0]
    outs = [values.new_zeros(N) for _ in range(3)]
    rgb, opacity, depth = [], [], []
    for r, (s, n) in enumerate(pi.tolist()):
        v = values[s:s + n]
        if is_alpha:
            a, t, trans = v, v.new_ones(()), []
            for k in range(n):
                trans.append(t)
                t = t * (1 - a[k])
            T = torch.stack(trans) if n else v.new_zeros(0)
        else:
            tau = v * (te[s:s + n] - ts[s:s + n])
            a = -torch.expm1(-tau)
            T = torch.exp(-torch.cat([tau.new_zeros(1), torch.cumsum(tau, 0)[:-1]]))[:n]
        w = T * a
        if eps > 0:
            w = torch.where(T >= eps, w, torch.zeros_like(w))
        idx = torch.arange(s, s + n)
        outs = [o.index_put((idx,), x) for o, x in zip(outs, (w, T, a))]
        o = w.sum()
        col = (w[:, None] * rgbs[s:s + n]).sum(0)
        if bg is not None:
            col = col + (1 - o) * (bg[r] if bg.dim() == 2 else bg)
        rgb.append(col)
        opacity.append(o)
        depth.append((w * 0.5 * (ts[s:s + n] + te[s:s + n])).sum() if ts is not None else o * 0)
    return (torch.stack(rgb), torch.stack(opacity), torch.stack(depth), *outs)


NAMES = ("rgb", "opacity", "depth", "weights")


def check(got, want, dtype, what=""):
    for name, o, r in zip(NAMES, got, want):
        testing.assert_close(o, r, "reduction", dtype, name=f"{name} {what}")


def check_grads(got, want, dtype, what="", g_rgb=None):
    """d_background = sum over rays of (1 - opacity) g_rgb: float32 carries 1 - opacity to an absolute
    ~1e-7, so once the rays are nearly opaque it is compared relative to |g_rgb|, not to itself."""
    for name, o, r in zip(("d_values", "d_rgbs", "d_background"), got, want):
        assert (o is None) == (r is None), name
        if o is None:
            continue
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        if name == "d_background" and g_rgb is not None:
            scale = (g_rgb.abs().sum(0) if r.dim() == 1 else g_rgb.abs()).norm().item()
            err = testing.rel_err(o, r, floor=scale)
            assert err <= testing.tolerance("reduction", dtype), f"{name} {what}: error {err:.3g} relative to |g_rgb|"
        else:
            testing.assert_close(o, r, "reduction", dtype, name=f"{name} {what}")


def check_unowned(pi, outs, grads):
    free = ~owned_mask(pi, outs[3].shape[0])
    if bool(free.any()):
        assert bool((outs[3][free] == 0).all()), "weights of samples of no ray must be 0"
        if grads is not None:
            assert bool((grads[0][free] == 0).all()), "d_values of samples of no ray must be 0"
            assert bool((grads[1][free] == 0).all()), "d_rgbs of samples of no ray must be 0"


def away_from_eps(kind, v, ts, te, pi, eps, margin):
    """True when no transmittance of the batch sits within a relative margin of eps (so a float32
    path, or a finite-difference step, cannot flip a sample across the early-stop threshold)."""
    v = v.double()
    tau = -torch.log1p(-v) if kind == "alpha" else v * (te.double() - ts.double())  # T = exp(-exclusive sum)
    first = torch.full_like(v, -1, dtype=torch.int64)  # the first sample of the ray owning each sample
    for s, c in pi.tolist():
        first[s:s + c] = s
    owned = first >= 0
    csum = torch.cat([tau.new_zeros(1), torch.cumsum(torch.where(owned, tau, torch.zeros_like(tau)), 0)])
    T = torch.exp(-(csum[:-1] - csum[first.clamp(min=0)]))[owned]
    return not bool(((T - eps).abs() < margin * eps).any())


def draw(R, g, kind, dtype, eps=0.0, max_count=9, sigma_high=10.0, margin=1e-3):
    """A ragged batch whose transmittances stay away from eps."""
    for _ in range(20):
        pi, N = ragged(R, g, max_count=max_count)
        v, c, ts, te = samples(N, g, kind, sigma_high=sigma_high, dtype=dtype)
        if eps == 0 or away_from_eps(kind, v, ts, te, pi, eps, margin):
            return pi, N, v, c, ts, te
    raise AssertionError("could not draw a batch away from the early-stop threshold")


# ---- against the packed per-ray loop ----------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_batches_match_packed_reference(backend, dtype, kind, g):
    for i, R in enumerate(SIZES):
        pi, N, v, c, ts, te = draw(R, g, kind, dtype, max_count=6 if backend == "triton" else 9)
        if kind == "alpha" and i % 2:
            ts = te = None  # alphas without intervals: depth 0
        bg = background(i, R, g, dtype)
        cot = cotangents(R, N, g)
        with testing.poisoned():
            got, ggot = run_op(kind, backend, v, c, ts, te, pi, bg, cot=cot)
        want, gwant = run_ref(kind, v, c, ts, te, pi, bg, cot=cot)
        what = f"R={R} N={N} bg={None if bg is None else tuple(bg.shape)}"
        assert [o.dtype for o in got] == [dtype] * 4
        check(got, want, dtype, what)
        check_grads(ggot, gwant, dtype, what, g_rgb=cot[0])
        check_unowned(pi, got, ggot)
        empty = pi[:, 1] == 0
        if bool(empty.any()):  # an empty ray shows the background, opacity 0, depth 0
            assert bool((got[1][empty] == 0).all()) and bool((got[2][empty] == 0).all())
            want_rgb = torch.zeros(R, 3, dtype=dtype) if bg is None else bg.expand(R, 3).to(dtype)
            assert torch.equal(got[0][empty], want_rgb[empty])
        if ts is None:
            assert bool((got[2] == 0).all())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", KINDS)
def test_without_weights(backend, kind, g):
    """return_weights False returns three outputs, equal to the ones with weights."""
    dev = device_of(backend)
    pi, N, v, c, ts, te = draw(7, g, kind, torch.float64)
    fn = pyeccv.volume_render if kind == "density" else pyeccv.volume_render_alpha
    three = fn(v.to(dev), c.to(dev), ts.to(dev), te.to(dev), pi.to(dev), backend=backend)
    four, _ = run_op(kind, backend, v, c, ts, te, pi)
    assert len(three) == 3
    for name, a, b in zip(NAMES, three, four):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", KINDS)
def test_no_rays(backend, kind, g):
    """packed_info (0, 2): every sample belongs to no ray; empty outputs, zero weights and gradients."""
    pi, N, v, c, ts, te = draw(7, g, kind, torch.float64)
    none = torch.zeros(0, 2, dtype=torch.int64)
    bg = testing.rand(3, g=g, dtype=torch.float64)
    got, grads = run_op(kind, backend, v, c, ts, te, none, bg, cot=cotangents(0, N, g))
    assert [tuple(o.shape) for o in got] == [(0, 3), (0,), (0,), (N,)]
    assert bool((got[3] == 0).all()) and all(bool((x == 0).all()) for x in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_form_matches_dense_render(dtype, g):
    for R, S in [(1, 1), (2, 7), (7, 13), (97, 5)]:
        s, c, ts, te = samples(R * S, g, dtype=dtype)
        s, ts, te, c = s.view(R, S), ts.view(R, S), te.view(R, S), c.view(R, S, 3)
        bg = testing.rand(R, 3, g=g, dtype=dtype)
        cot = cotangents(R, R * S, g)
        cot = cot[:3] + (cot[3].view(R, S),)
        ls, lc, lb = _leaves("cpu", s, c, bg)
        with testing.poisoned():
            got = pyeccv.volume_render(ls, lc, ts, te, background=lb, return_weights=True)
        ggot = _grads(got, cot, [ls, lc, lb])
        rs, rc, rb = _leaves("cpu", s.double(), c.double(), bg.double())
        want = dense_render(rs, rc, ts.double(), te.double(), rb)
        gwant = _grads(want, cot, [rs, rc, rb])
        assert got[3].shape == (R, S)
        check(got, want, dtype, f"R={R} S={S}")
        check_grads(ggot, gwant, dtype, f"R={R} S={S}", g_rgb=cot[0])
        # render_weights on the dense form: nerfacc's (weights, transmittance, alphas)
        w, t, a = pyeccv.render_weights(s, ts, te)
        tau = s.double() * (te - ts).double()
        testing.assert_close(w, want[3], "reduction", dtype, name="weights")
        testing.assert_close(t, torch.exp(-(torch.cumsum(tau, -1) - tau)), "reduction", dtype, name="trans")
        testing.assert_close(a, 1 - torch.exp(-tau), "elementwise", dtype, name="alphas")


def test_small_alphas_keep_full_precision(g):
    """alpha = 1 - exp(-tau) for tau down to 1e-7 (a thin sample): float32 alphas within a few ulp
    of the float64 value, not the log2(1/tau) bits that 1 - exp(-tau) written out loses."""
    tau = torch.logspace(-7, 1, 101, dtype=torch.float64)[torch.randperm(101, generator=g)]
    s = tau.float().view(1, -1)
    ts = torch.zeros_like(s)
    te = torch.ones_like(s)
    _, _, a = pyeccv.render_weights(s, ts, te)
    exact = -torch.expm1(-s.double())
    assert float(((a.double() - exact).abs() / exact).max()) < 4 * 2.0 ** -24 * 4


# ---- render_weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_render_weights_match_packed_reference(backend, dtype, eps, g):
    dev = device_of(backend)
    for R in SIZES:
        for kind in KINDS:
            pi, N, v, c, ts, te = draw(R, g, kind, dtype, eps=eps, max_count=6 if backend == "triton" else 9)
            cot = [testing.randn(N, g=g, dtype=torch.float64) for _ in range(3)]
            (lv,) = _leaves(dev, v)
            with testing.poisoned():
                if kind == "density":
                    got = pyeccv.render_weights(lv, ts.to(dev), te.to(dev), pi.to(dev), early_stop_eps=eps,
                                                backend=backend)
                else:
                    got = pyeccv.render_weights_from_alpha(lv, pi.to(dev), early_stop_eps=eps, backend=backend)
            cot = cot[:len(got)]
            (ggot,) = _grads(got, cot, [lv])
            (rv,) = _leaves("cpu", v.double())
            want = packed_render_weights(rv, ts.double(), te.double(), pi, is_alpha=kind == "alpha",
                                         early_stop_eps=eps)[:len(got)]
            (gwant,) = _grads(want, cot, [rv])
            for name, o, r in zip(("weights", "transmittance", "alphas"), got, want):
                assert o.dtype == dtype
                testing.assert_close(o.cpu(), r.detach(), "reduction", dtype, name=f"{name} {kind} R={R}")
            testing.assert_close(ggot, gwant, "reduction", dtype, name=f"d_values {kind} R={R}")
            free = ~owned_mask(pi, N)
            assert all(bool((o.cpu()[free] == 0).all()) for o in got) and bool((ggot[free] == 0).all())


# ---- early stopping -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-4, 0.3])
def test_early_stopping_matches_packed_reference(backend, dtype, eps, g):
    stopped = 0
    for i, R in enumerate(SIZES):
        for kind in KINDS:
            # dense enough that T falls below 1e-4 inside most rays
            pi, N, v, c, ts, te = draw(R, g, kind, dtype, eps=eps, sigma_high=60.0,
                                       max_count=8 if backend == "triton" else 16)
            bg = background(i + 1, R, g, dtype)
            cot = cotangents(R, N, g)
            got, ggot = run_op(kind, backend, v, c, ts, te, pi, bg, eps=eps, cot=cot)
            want, gwant = run_ref(kind, v, c, ts, te, pi, bg, eps=eps, cot=cot)
            what = f"{kind} eps={eps} R={R}"
            check(got, want, dtype, what)
            check_grads(ggot, gwant, dtype, what, g_rgb=cot[0])
            check_unowned(pi, got, ggot)
            _, T, a = packed_render_weights(v.double(), ts.double(), te.double(), pi, is_alpha=kind == "alpha")
            cut = owned_mask(pi, N) & (T < eps)
            stopped += int(cut.sum())
            assert bool((got[3][cut] == 0).all()), f"weights after T < eps must be 0 ({what})"
            assert bool((ggot[0][cut] == 0).all()), f"d_values after T < eps must be 0 ({what})"
            assert bool((ggot[1][cut] == 0).all()), f"d_rgbs after T < eps must be 0 ({what})"
    assert stopped > 0, "early stopping never triggered: the test inputs are too thin"


# ---- alpha = 1, sigma = 0 and very large densities -----------------------------------------------------
# Rays (sigma per sample) with exact zeros, runs of zeros, and densities far past alpha = 1.
EDGE_RAYS = [
    [0.0, 0.0, 0.0],
    [1e4],
    [0.0, 1e4, 2.0, 3.0],
    [1.5, 0.0, 0.0, 1e10, 0.5],
    [2.0, 1e30, 1e30, 0.7],
    [0.0, 0.5, 1e30],
    [3.0, 0.0, 4.0, 0.0, 1e4, 0.0],
    [],
    [0.25],
]


def edge_batch(g, kind, dtype):
    """EDGE_RAYS packed out of order with unowned samples between them; alphas: the densities
    mapped to exact 0 and exact 1 (alpha = 1 - exp(-sigma dt) rounds to 1 past ~40)."""
    order = torch.randperm(len(EDGE_RAYS), generator=g).tolist()
    pi = torch.zeros(len(EDGE_RAYS), 2, dtype=torch.int64)
    vals, pos = [], 0
    for r in order:
        vals += [0.3]  # an unowned sample before each ray
        pos += 1
        pi[r] = torch.tensor([pos, len(EDGE_RAYS[r])])
        vals += EDGE_RAYS[r]
        pos += len(EDGE_RAYS[r])
    N = pos
    v = torch.tensor(vals, dtype=torch.float64)
    ts = torch.cumsum(testing.rand(N, g=g, low=0.05, high=0.3), 0)
    te = ts + testing.rand(N, g=g, low=0.05, high=0.2)
    if kind == "alpha":
        v = torch.where(v >= 1e4, torch.ones_like(v), -torch.expm1(-v * 0.1))
    c = testing.rand(N, 3, g=g)
    return pi, N, *(x.to(dtype) for x in (v, c, ts, te))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_saturated_and_empty_segments(backend, dtype, kind, eps, g):
    pi, N, v, c, ts, te = edge_batch(g, kind, dtype)
    R = pi.shape[0]
    bg = testing.rand(R, 3, g=g, dtype=dtype)
    cot = cotangents(R, N, g)
    with testing.poisoned():
        got, ggot = run_op(kind, backend, v, c, ts, te, pi, bg, eps=eps, cot=cot)
    lv, lc, lb = _leaves("cpu", v.double(), c.double(), bg.double())
    want = loop_render(lv, lc, ts.double(), te.double(), pi, lb, is_alpha=kind == "alpha", eps=eps)[:4]
    gwant = _grads(want, cot, [lv, lc, lb])
    for x in got + ggot:
        assert bool(torch.isfinite(x).all())
    check(got, [w.detach() for w in want], dtype, f"{kind} eps={eps}")
    check_grads(ggot, gwant, dtype, f"{kind} eps={eps}", g_rgb=cot[0])
    check_unowned(pi, got, ggot)


@pytest.mark.parametrize("backend", backends())
def test_alpha_one_gradient_by_hand(backend, g):
    """alphas (0.3, 1, 0.5): w = (0.3, 0.7, 0), and for L = sum g_i w_i
    dL/da0 = g0 - g1, dL/da1 = 0.7 g1 - 0.35 g2, dL/da2 = 0 (a cumprod / (1 - alpha) gets a1 wrong)."""
    dev = device_of(backend)
    a = torch.tensor([0.3, 1.0, 0.5], dtype=torch.float64, device=dev, requires_grad=True)
    pi = torch.tensor([[0, 3]], device=dev)
    gw = testing.randn(3, g=g, dtype=torch.float64)
    want = torch.tensor([gw[0] - gw[1], 0.7 * gw[1] - 0.35 * gw[2], 0.0], dtype=torch.float64)
    w, t = pyeccv.render_weights_from_alpha(a, pi, backend=backend)
    torch.testing.assert_close(w.detach().cpu(), torch.tensor([0.3, 0.7, 0.0], dtype=torch.float64))
    torch.testing.assert_close(t.detach().cpu(), torch.tensor([1.0, 0.7, 0.0], dtype=torch.float64))
    (d,) = torch.autograd.grad((w * gw.to(dev)).sum(), a)
    torch.testing.assert_close(d.cpu(), want, rtol=1e-12, atol=1e-12)
    # the same through compositing: with g_rgb only, g_i = g_rgb . (c_i - bg)
    c = testing.rand(3, 3, g=g, dtype=torch.float64)
    bg = testing.rand(3, g=g, dtype=torch.float64)
    g_rgb = testing.randn(1, 3, g=g, dtype=torch.float64)
    gi = ((c - bg) * g_rgb).sum(1)
    rgb, _, _ = pyeccv.volume_render_alpha(a, c.to(dev), packed_info=pi, background=bg.to(dev), backend=backend)
    (d,) = torch.autograd.grad((rgb * g_rgb.to(dev)).sum(), a)
    want = torch.tensor([gi[0] - gi[1], 0.7 * gi[1] - 0.35 * gi[2], 0.0], dtype=torch.float64)
    torch.testing.assert_close(d.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends())
def test_saturating_density_gradient_by_hand(backend, g):
    """sigmas (s0, 1e30, s2) and (0, 0, s2): dL/dsigma_j = dt_j (g_j T_{j+1} - sum_{i>j} g_i w_i)."""
    dev = device_of(backend)
    s0, s2 = 1.3, 0.8
    dt = testing.rand(3, g=g, low=0.1, high=0.5, dtype=torch.float64)
    ts = torch.cumsum(dt, 0) - dt
    te = ts + dt
    gw = testing.randn(3, g=g, dtype=torch.float64)
    pi = torch.tensor([[0, 3]], device=dev)
    e0 = math.exp(-s0 * dt[0])
    cases = {
        (s0, 1e30, s2): ([1 - e0, e0, 0.0], [dt[0] * (gw[0] * e0 - gw[1] * e0), 0.0, 0.0]),
    }
    e2 = math.exp(-s2 * dt[2])
    cases[(0.0, 0.0, s2)] = ([0.0, 0.0, 1 - e2], [dt[0] * (gw[0] - gw[2] * (1 - e2)),
                                                  dt[1] * (gw[1] - gw[2] * (1 - e2)), dt[2] * gw[2] * e2])
    for sig, (w_want, d_want) in cases.items():
        s = torch.tensor(sig, dtype=torch.float64, device=dev, requires_grad=True)
        w, _, _ = pyeccv.render_weights(s, ts.to(dev), te.to(dev), pi, backend=backend)
        torch.testing.assert_close(w.detach().cpu(), torch.tensor(w_want, dtype=torch.float64), rtol=1e-12,
                                   atol=1e-30)
        (d,) = torch.autograd.grad((w * gw.to(dev)).sum(), s)
        torch.testing.assert_close(d.cpu(), torch.tensor([float(x) for x in d_want], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-30, msg=f"sigmas {sig}")


# ---- gradcheck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_gradcheck(backend, kind, eps, g):
    dev = device_of(backend)
    R, max_count = (5, 5) if backend == "native" or dev == "cuda" else (2, 3)
    for _ in range(20):
        pi, N, v, c, ts, te = draw(R, g, kind, torch.float64, max_count=max_count, sigma_high=6.0)
        if kind == "alpha":
            v = v.clamp(0.02, 0.9)  # finite differences stay inside (0, 1)
        if eps == 0 or away_from_eps(kind, v, ts, te, pi, eps, 1e-3):
            break
    pi, ts, te = pi.to(dev), ts.to(dev), te.to(dev)
    fn = pyeccv.volume_render if kind == "density" else pyeccv.volume_render_alpha
    for bg in (testing.rand(3, g=g, dtype=torch.float64), testing.rand(R, 3, g=g, dtype=torch.float64)):
        args = [x.to(dev).requires_grad_() for x in (v, c, bg)]
        assert torch.autograd.gradcheck(
            lambda a, b, k: fn(a, b, ts, te, pi, background=k, early_stop_eps=eps, return_weights=True,
                               backend=backend), args, eps=1e-6, atol=1e-7)
        if backend == "triton":
            break
    x = v.to(dev).requires_grad_()
    if kind == "density":  # through weights, transmittance and alphas
        assert torch.autograd.gradcheck(
            lambda a: pyeccv.render_weights(a, ts, te, pi, early_stop_eps=eps, backend=backend), (x,), eps=1e-6,
            atol=1e-7)
    else:
        assert torch.autograd.gradcheck(
            lambda a: pyeccv.render_weights_from_alpha(a, pi, early_stop_eps=eps, backend=backend), (x,), eps=1e-6,
            atol=1e-7)


def test_gradcheck_dense_and_no_background(g):
    R, S = 3, 4
    s, c, ts, te = samples(R * S, g)
    for fn, val in ((pyeccv.volume_render, s), (pyeccv.volume_render_alpha, s.clamp(0.02, 0.9))):
        args = (val.view(R, S).clone().requires_grad_(), c.view(R, S, 3).clone().requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, ts.view(R, S), te.view(R, S), return_weights=True),
                                        args, eps=1e-6, atol=1e-7)


# ---- half precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs(dtype, kind, g):
    """Computed in fp32, returned in the input dtype; against float64 on the rounded inputs."""
    for i, R in enumerate((7, 97)):
        pi, N, v, c, ts, te = draw(R, g, kind, torch.float64, max_count=12)
        v, c = v.to(dtype), c.to(dtype)
        ts = torch.cumsum(testing.rand(N, g=g, high=0.05), 0).to(dtype)  # t small enough for exact dt
        te = (ts.double() + testing.rand(N, g=g, high=0.2)).to(dtype)
        te = torch.maximum(te, ts)
        bg = background(i + 1, R, g, dtype)
        cot = cotangents(R, N, g)
        got, ggot = run_op(kind, "native", v, c, ts, te, pi, bg, cot=cot)
        want, gwant = run_ref(kind, v, c, ts, te, pi, bg, cot=cot)
        assert all(o.dtype == dtype for o in got)
        check(got, want, dtype, f"{kind} R={R}")
        check_grads(ggot, gwant, dtype, f"{kind} R={R}", g_rgb=cot[0])
        rw = pyeccv.render_weights(v, ts, te, pi) if kind == "density" else pyeccv.render_weights_from_alpha(v, pi)
        want_w = packed_render_weights(v.double(), ts.double(), te.double(), pi, is_alpha=kind == "alpha")
        for name, o, r in zip(("weights", "transmittance", "alphas"), rw, want_w):
            assert o.dtype == dtype
            testing.assert_close(o, r, "reduction", dtype, name=name)


# ---- opcheck and torch.compile -----------------------------------------------------------------------
def test_opcheck(g):
    R = 7
    pi, N, v, c, ts, te = draw(R, g, "density", torch.float32)
    bg = testing.rand(R, 3, g=g)
    ops = torch.ops.pyeccv
    for is_alpha in (False, True):
        vals = v.clamp(max=0.9) if is_alpha else v
        t0, t1 = (None, None) if is_alpha else (ts, te)
        for bgx, rw, eps in ((bg, True, 0.0), (None, False, 0.2), (bg[0], True, 1e-4)):
            args = (vals.clone().requires_grad_(), c.clone().requires_grad_(), t0, t1, pi,
                    None if bgx is None else bgx.clone().requires_grad_(), eps, is_alpha, rw, "auto")
            testing.opcheck(ops.volume_render_fwd.default, args)
            out = ops.volume_render_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
            gw = torch.randn(N) if rw else None
            testing.opcheck(ops.volume_render_bwd.default,
                            (torch.randn(R, 3), torch.randn(R), torch.randn(R), gw, vals, c, t0, t1, pi, bgx,
                             out[4], eps, is_alpha, "auto"), skip_autograd=True)
        for eps in (0.0, 0.2):
            testing.opcheck(ops.render_weights_fwd.default, (vals.clone().requires_grad_(), t0, t1, pi, eps,
                                                             is_alpha, "auto"))
            testing.opcheck(ops.render_weights_bwd.default, (torch.randn(N), torch.randn(N), torch.randn(N), vals,
                                                             t0, t1, pi, eps, is_alpha, "auto"), skip_autograd=True)


def test_compile_fullgraph_with_backward(g):
    R = 7
    pi, N, v, c, ts, te = draw(R, g, "density", torch.float32)
    w = testing.randn(3, 3, g=g)
    bg = testing.rand(3, g=g)

    def f(raw_sigma, feats, bgx):  # activations, the renderer and a photometric loss in one graph
        rgb, opacity, depth = pyeccv.volume_render(torch.nn.functional.softplus(raw_sigma),
                                                   torch.sigmoid(feats @ w), ts, te, pi, background=bgx,
                                                   early_stop_eps=1e-4)
        return (rgb - 0.5).square().sum() + opacity.sum() + 0.1 * depth.sum()

    def grads(loss, leaves):
        return torch.autograd.grad(loss, leaves)

    leaves = [x.clone().requires_grad_() for x in (v, c, bg)]
    got = testing.compile_check(f, *leaves, compare=lambda a, b: torch.testing.assert_close(a, b))
    want = f(*leaves)
    for a, b in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(a, b)
    # the dense form and render_weights compile too
    s, _, t0, t1 = samples(12, g, dtype=torch.float32)
    d = testing.compile_check(lambda a, b, e: pyeccv.render_weights(a, b, e), s.view(3, 4), t0.view(3, 4),
                              t1.view(3, 4))
    assert d[0].shape == (3, 4)


# ---- bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs():
    N, R = 8, 2
    s, c = torch.rand(N), torch.rand(N, 3)
    ts = torch.arange(N, dtype=torch.float32)
    te = ts + 0.5
    pi = torch.tensor([[0, 3], [4, 4]])
    vr = pyeccv.volume_render
    # mismatched lengths
    with pytest.raises(ValueError, match=r"rgbs must have shape \(8, 3\), got \(7, 3\)"):
        vr(s, c[:7], ts, te, pi)
    with pytest.raises(ValueError, match=r"rgbs must have shape \(8, 3\), got \(8, 4\)"):
        vr(s, torch.rand(N, 4), ts, te, pi)
    with pytest.raises(ValueError, match=r"t_starts must have shape \(8,?\), got \(9,\)"):
        vr(s, c, torch.arange(9.0), te, pi)
    with pytest.raises(ValueError, match=r"t_ends must have shape \(8,?\), got \(7,\)"):
        vr(s, c, ts, te[:7], pi)
    with pytest.raises(ValueError, match="t_starts is required"):
        vr(s, c, None, te, pi)
    with pytest.raises(ValueError, match="t_starts and t_ends must be given together"):
        pyeccv.volume_render_alpha(s, c, ts, None, pi)
    # packed_info out of range or overlapping
    for bad, r in (([[0, 3], [5, 4]], 1), ([[-1, 3], [4, 4]], 0), ([[0, -1], [4, 4]], 0), ([[0, 3], [9, 0]], 1)):
        with pytest.raises(ValueError, match=rf"packed_info\[{r}\] = .* is out of range for 8 samples"):
            vr(s, c, ts, te, torch.tensor(bad))
    for bad in ([[0, 3], [2, 4]], [[4, 4], [0, 5]], [[0, 8], [2, 1]], [[5, 2], [0, 2], [1, 3]]):
        with pytest.raises(ValueError, match="packed_info: rays overlap"):
            vr(s, c, ts, te, torch.tensor(bad))
    # negative intervals
    te_bad = te.clone()
    te_bad[5] = ts[5] - 0.1
    with pytest.raises(ValueError, match="t_ends < t_starts"):
        vr(s, c, ts, te_bad, pi)
    with pytest.raises(ValueError, match="t_ends < t_starts"):
        pyeccv.render_weights(s, ts, te_bad, pi)
    # wrong dtype / device
    with pytest.raises(ValueError, match="sigmas must have dtype in"):
        vr(s.long(), c, ts, te, pi)
    with pytest.raises(ValueError, match="alphas must have dtype in"):
        pyeccv.volume_render_alpha(s.long(), c, packed_info=pi)
    with pytest.raises(ValueError, match=r"rgbs must have the dtype of sigmas \(torch.float32\), got torch.float64"):
        vr(s, c.double(), ts, te, pi)
    with pytest.raises(ValueError, match="t_starts must have the dtype of sigmas"):
        vr(s, c, ts.double(), te, pi)
    with pytest.raises(ValueError, match="rgbs must be on cpu"):
        vr(s, c.to("meta"), ts, te, pi)
    with pytest.raises(ValueError, match="t_ends must be on cpu"):
        vr(s, c, ts, te.to("meta"), pi)
    with pytest.raises(ValueError, match="packed_info must be on cpu"):
        vr(s, c, ts, te, pi.to("meta"))
    with pytest.raises(ValueError, match="background must be on cpu"):
        vr(s, c, ts, te, pi, background=torch.rand(3, device="meta"))
    # packed_info not an integer (R, 2)
    for bad in (pi.float(), pi.bool(), torch.zeros(R, 3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"packed_info must be an integer \(rays, 2\) tensor"):
            vr(s, c, ts, te, bad)
    with pytest.raises(ValueError, match="packed_info must be 2-D"):
        vr(s, c, ts, te, pi.flatten())
    with pytest.raises(ValueError, match="sigmas must be 1-D"):
        vr(s[None], c, ts, te, pi)
    # background wrong shape
    for bad in (torch.rand(4), torch.rand(R + 1, 3), torch.rand(R, 4), torch.rand(1, 3)):
        with pytest.raises(ValueError, match=rf"background must have shape \(3,\) or \({R}, 3\)"):
            vr(s, c, ts, te, pi, background=bad)
    # early_stop_eps, backend
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="early_stop_eps must be in"):
            vr(s, c, ts, te, pi, early_stop_eps=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        vr(s, c, ts, te, pi, backend="cuda")
    # the same checks guard render_weights and the alpha variants
    with pytest.raises(ValueError, match="packed_info: rays overlap"):
        pyeccv.render_weights(s, ts, te, torch.tensor([[0, 3], [2, 4]]))
    with pytest.raises(ValueError, match="out of range"):
        pyeccv.render_weights_from_alpha(s, torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match=r"t_starts must have shape \(8,?\)"):
        pyeccv.render_weights(s, ts[:5], te, pi)
    with pytest.raises(ValueError, match=r"packed_info must be an integer"):
        pyeccv.render_weights_from_alpha(s, pi.double())


def test_bad_dense_inputs():
    """The dense (R, S) form: mismatched shapes are a ValueError naming the argument, not a reshape
    error."""
    R, S = 3, 4
    s, c, ts = torch.rand(R, S), torch.rand(R, S, 3), torch.rand(R, S)
    te = ts + 0.1
    with pytest.raises(ValueError, match="give packed_info"):
        pyeccv.volume_render(s.flatten(), c, ts, te)
    with pytest.raises(ValueError, match="t_starts"):
        pyeccv.volume_render(s, c, ts[:, :3], te)
    with pytest.raises(ValueError, match="rgbs"):
        pyeccv.volume_render(s, torch.rand(R, S + 1, 3), ts, te)
    with pytest.raises(ValueError, match="t_ends"):
        pyeccv.render_weights(s, ts, te[:2])


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_cuda_matches_native(kind, eps, g):
    for i, R in enumerate((1, 97, 4099)):
        pi, N, v, c, ts, te = draw(R, g, kind, torch.float32, eps=eps, max_count=200, sigma_high=20.0,
                                       margin=1e-5)
        bg = background(i, R, g, torch.float32)
        cot = cotangents(R, N, g)
        want, gwant = run_op(kind, "native", v, c, ts, te, pi, bg, eps=eps, cot=cot)
        lv, lc, lb = _leaves("cuda", v, c, bg)
        fn = pyeccv.volume_render if kind == "density" else pyeccv.volume_render_alpha
        with testing.poisoned():
            got = fn(lv, lc, ts.cuda(), te.cuda(), pi.cuda(), background=lb, early_stop_eps=eps,
                     return_weights=True)
        ggot = _grads(got, cot, [lv, lc, lb])
        check([o.detach().cpu() for o in got], want, torch.float32, f"cuda R={R}")
        check_grads(ggot, gwant, torch.float32, f"cuda R={R}", g_rgb=cot[0])
        rw = pyeccv.render_weights(v.cuda(), ts.cuda(), te.cuda(), pi.cuda(), early_stop_eps=eps) \
            if kind == "density" else pyeccv.render_weights_from_alpha(v.cuda(), pi.cuda(), early_stop_eps=eps)
        rn = pyeccv.render_weights(v, ts, te, pi, early_stop_eps=eps) if kind == "density" else \
            pyeccv.render_weights_from_alpha(v, pi, early_stop_eps=eps)
        for a, b in zip(rw, rn):
            testing.assert_close(a.cpu(), b, "reduction", torch.float32)
    # bf16 on the GPU: finite, dtypes kept
    pi, N, v, c, ts, te = draw(97, g, kind, torch.float32)
    lv, lc = _leaves("cuda", v.to(torch.bfloat16), c.to(torch.bfloat16))
    fn = pyeccv.volume_render if kind == "density" else pyeccv.volume_render_alpha
    out = fn(lv, lc, ts.cuda().bfloat16(), te.cuda().bfloat16(), pi.cuda())
    sum(o.float().sum() for o in out).backward()
    assert out[0].dtype == torch.bfloat16 and lv.grad.dtype == torch.bfloat16 and bool(torch.isfinite(lv.grad).all())


@pytest.mark.cuda
def test_nerfacc_parity(g):
    nerfacc = pytest.importorskip("nerfacc")
    R = 513
    pi, N = ragged(R, g, max_count=64, gaps=False, shuffle=False)  # nerfacc's layout: in order, no gaps
    v, c, ts, te = (x.float().cuda() for x in samples(N, g, sigma_high=20.0))
    pi = pi.cuda()
    ray_indices = torch.repeat_interleave(torch.arange(R, device="cuda"), pi[:, 1])
    w_ref, t_ref, a_ref = nerfacc.render_weight_from_density(ts, te, v, ray_indices=ray_indices, n_rays=R)
    w, t, a = pyeccv.render_weights(v, ts, te, pi)
    for name, o, r in (("weights", w, w_ref), ("transmittance", t, t_ref), ("alphas", a, a_ref)):
        testing.assert_close(o, r, "reduction", torch.float32, name=name)
    alphas = a_ref.detach().clamp(max=0.99)
    wa_ref, ta_ref = nerfacc.render_weight_from_alpha(alphas, ray_indices=ray_indices, n_rays=R)
    wa, ta = pyeccv.render_weights_from_alpha(alphas, pi)
    testing.assert_close(wa, wa_ref, "reduction", torch.float32, name="weights (alpha)")
    testing.assert_close(ta, ta_ref, "reduction", torch.float32, name="transmittance (alpha)")
    # compositing: nerfacc's accumulate_along_rays, background; gradients of the weights
    vs, cs = v.clone().requires_grad_(), c.clone().requires_grad_()
    vn, cn = v.clone().requires_grad_(), c.clone().requires_grad_()
    bg = torch.rand(3, device="cuda")
    rgb, opacity, _ = pyeccv.volume_render(vs, cs, ts, te, pi, background=bg)
    wn, _, _ = nerfacc.render_weight_from_density(ts, te, vn, ray_indices=ray_indices, n_rays=R)
    rgb_n = nerfacc.accumulate_along_rays(wn, values=cn, ray_indices=ray_indices, n_rays=R)
    op_n = nerfacc.accumulate_along_rays(wn, values=None, ray_indices=ray_indices, n_rays=R)
    rgb_n = rgb_n + bg * (1.0 - op_n)
    testing.assert_close(rgb, rgb_n, "reduction", torch.float32, name="rgb")
    testing.assert_close(opacity, op_n.squeeze(-1), "reduction", torch.float32, name="opacity")
    cot = torch.randn(R, 3, device="cuda")
    (rgb * cot).sum().backward()
    (rgb_n * cot).sum().backward()
    testing.assert_close(vs.grad, vn.grad, "reduction", torch.float32, name="d_sigmas")
    testing.assert_close(cs.grad, cn.grad, "reduction", torch.float32, name="d_rgbs")
    # early stopping: nerfacc's visibility (T >= eps) masks the weights
    vis = nerfacc.render_visibility_from_density(ts, te, v, ray_indices=ray_indices, n_rays=R, early_stop_eps=1e-2)
    w_es, _, _ = pyeccv.render_weights(v, ts, te, pi, early_stop_eps=1e-2)
    testing.assert_close(w_es, w_ref * vis, "reduction", torch.float32, name="weights (early stop)")
