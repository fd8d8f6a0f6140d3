"""pyeccv.models.NeRF and the NeRF example: encoding, network, inverse-CDF sampling, rendering
through pyeccv.volume_render against the dense reference, and the example's exact scene renderer
against brute-force quadrature."""
import math
import struct
import zlib

import torch
from torch.nn import functional as F

import pyeccv
from pyeccv import testing
from pyeccv.examples import nerf as example
from pyeccv.models import NeRF, NeRFMLP, PositionalEncoding, sample_pdf
from pyeccv.models import nerf as nerf_module
from pyeccv.reference.volume_render import dense_render

TINY = dict(depth=3, width=32, skips=(1,), pos_freqs=4, dir_freqs=2, n_coarse=12, n_fine=10)


def _rays(R, g, dtype=torch.float32):
    """Rays from a sphere of radius 3 towards the origin (jittered), not unit length."""
    o = F.normalize(testing.randn(R, 3, g=g, dtype=torch.float64), dim=-1) * 3
    d = -o + 0.3 * testing.randn(R, 3, g=g, dtype=torch.float64)
    return o.to(dtype), (d * (0.5 + torch.rand(R, 1, generator=g, dtype=torch.float64))).to(dtype)


# ---- network ----------------------------------------------------------------------------------
def test_positional_encoding_dims_and_values(g):
    assert PositionalEncoding(10).out_dim == 63 and PositionalEncoding(4).out_dim == 27  # the paper's 60 + 3, 24 + 3
    assert PositionalEncoding(0).out_dim == 3
    enc = PositionalEncoding(3)
    x = testing.randn(2, 5, 3, g=g)
    y = enc(x)
    assert y.shape == (2, 5, 21)
    # the official order: x, sin(x), cos(x), sin(2x), cos(2x), sin(4x), cos(4x), 3 channels each
    want = torch.cat([x] + [f(2.0 ** k * x) for k in range(3) for f in (torch.sin, torch.cos)], -1)
    torch.testing.assert_close(y, want)


def test_paper_config_builds():
    model = NeRF()
    assert (model.n_coarse, model.n_fine) == (64, 128)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # nerf-pytorch's NeRF(D=8, W=256, input_ch=63, input_ch_views=27, skips=[4], use_viewdirs=True)
    assert count(model.coarse) == 595844 and count(model) == 2 * 595844
    mlp = model.coarse
    assert len(mlp.pts_linears) == 8
    assert [lin.in_features for lin in mlp.pts_linears] == [63, 256, 256, 256, 256, 256 + 63, 256, 256]
    assert mlp.views_linear.in_features == 256 + 27 and mlp.views_linear.out_features == 128


def test_mlp_skip_and_heads(g):
    mlp = NeRFMLP(pos_dim=9, dir_dim=6, depth=4, width=16, skips=(1,), sigma_activation="softplus")
    x, d = testing.randn(7, 9, g=g), testing.randn(7, 6, g=g)
    sigma, rgb = mlp(x, d)
    assert sigma.shape == (7,) and rgb.shape == (7, 3)
    assert bool((sigma > 0).all()) and bool(((rgb > 0) & (rgb < 1)).all())
    # by hand: the input is concatenated (first) to the output of layer 1
    h = F.relu(mlp.pts_linears[1](F.relu(mlp.pts_linears[0](x))))
    h = torch.cat([x, h], -1)
    h = F.relu(mlp.pts_linears[3](F.relu(mlp.pts_linears[2](h))))
    torch.testing.assert_close(sigma, F.softplus(mlp.sigma_linear(h)[:, 0]))
    v = F.relu(mlp.views_linear(torch.cat([mlp.feature_linear(h), d], -1)))
    torch.testing.assert_close(rgb, torch.sigmoid(mlp.rgb_linear(v)))


def test_tiny_forward_backward(g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = NeRF(**TINY)
    o, d = _rays(9, g)
    out = model.render_rays(o, d, 1.5, 4.5, perturb=True, background=torch.ones(3), generator=g)
    assert set(out) >= {"rgb_coarse", "rgb_fine", "opacity", "depth"}
    assert out["rgb_coarse"].shape == out["rgb_fine"].shape == (9, 3)
    assert out["opacity"].shape == out["depth"].shape == (9,)
    for v in out.values():
        assert bool(torch.isfinite(v).all())
    op = out["opacity"]
    assert bool(((op >= 0) & (op <= 1 + 1e-6)).all())
    # depth in units of t: the weighted mean of bin centres lies in [near, far] x opacity
    assert bool((out["depth"] >= 1.5 * op - 1e-5).all()) and bool((out["depth"] <= 4.5 * op + 1e-5).all())
    (out["rgb_fine"].square().sum() + out["rgb_coarse"].square().sum() + out["depth"].sum()).backward()
    for net, opacity in ((model.coarse, out["opacity_coarse"]), (model.fine, out["opacity"])):
        grads = [p.grad for p in net.parameters()]
        assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
        # a freshly initialised network can output raw densities < 0 at every sample: the official
        # ReLU then gives zero opacity and exactly zero gradients (seed 1551133312 does)
        if bool((opacity > 0).any()):
            assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_coarse_only_and_eval_is_deterministic(g):
    model = NeRF(**{**TINY, "n_fine": 0})
    assert model.fine is None
    o, d = _rays(5, g)
    a = model.render_rays(o, d, 1.5, 4.5, perturb=False)
    b = model.render_rays(o, d, 1.5, 4.5, perturb=False)
    torch.testing.assert_close(a["rgb_fine"], a["rgb_coarse"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    near = torch.full((5,), 1.5)
    c = model(o, d, near, near + 3.0, perturb=False)  # per-ray bounds, forward == render_rays
    torch.testing.assert_close(c["rgb_fine"], a["rgb_fine"])


# ---- inverse-CDF sampling ---------------------------------------------------------------------
def _bins(R, B, g):
    return torch.cumsum(0.05 + torch.rand(R, B + 1, generator=g, dtype=torch.float64), -1)


def test_sample_pdf_monotone_and_within_bins(g):
    bins = _bins(6, 9, g)
    w = torch.rand(6, 9, generator=g, dtype=torch.float64) * (torch.rand(6, 9, generator=g) > 0.4)
    s = sample_pdf(bins, w, 50, det=True)
    assert s.shape == (6, 50)
    assert bool((s[:, 1:] >= s[:, :-1]).all())  # det: u sorted -> samples sorted
    for x in (s, sample_pdf(bins, w, 50, det=False, generator=g)):
        assert bool((x >= bins[:, :1]).all()) and bool((x <= bins[:, -1:]).all())


def test_sample_pdf_inverts_the_cdf(g):
    # uniform weights on uneven bins: piecewise-linear cdf; det samples = its exact inverse at linspace
    bins = _bins(3, 7, g)
    w = bins[:, 1:] - bins[:, :-1]  # density constant in t
    s = sample_pdf(bins, w, 11, det=True)
    want = bins[:, :1] + (bins[:, -1:] - bins[:, :1]) * torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(s, want, rtol=0, atol=1e-4)  # the 1e-5 padding of each weight
    # all the mass in one bin: samples land in it
    w = torch.zeros(3, 7, dtype=torch.float64)
    w[:, 4] = 1.0
    s = sample_pdf(bins, w, 64, det=False, generator=g)
    inside = (s >= bins[:, 4:5]) & (s <= bins[:, 5:6])
    assert float(inside.double().mean()) > 0.99


def test_sample_pdf_histogram_matches_weights(g):
    bins = torch.linspace(0, 1, 6, dtype=torch.float64)[None]
    w = torch.tensor([[1.0, 0.0, 3.0, 2.0, 4.0]], dtype=torch.float64)
    n = 200_000
    s = sample_pdf(bins, w, n, det=False, generator=g)
    hist = torch.histc(s, bins=5, min=0, max=1) / n
    # binomial std per bin <= sqrt(0.25 / n) ~ 1.1e-3: 6 sigma
    torch.testing.assert_close(hist, w[0] / w.sum(), rtol=0, atol=7e-3)


# ---- rendering through the op -----------------------------------------------------------------
def _dense_volume_render(sigmas, rgbs, t_starts, t_ends, packed_info=None, *, background=None, early_stop_eps=0.0,
                         return_weights=False):
    assert packed_info is None and early_stop_eps == 0.0
    rgb, opacity, depth, weights = dense_render(sigmas, rgbs, t_starts, t_ends, background)
    return (rgb, opacity, depth, weights) if return_weights else (rgb, opacity, depth)


def test_model_rendering_matches_dense_reference(g, monkeypatch):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = NeRF(**TINY).double()
    o, d = _rays(7, g, dtype=torch.float64)
    bg = torch.rand(7, 3, generator=g, dtype=torch.float64)

    def run(perturb):
        model.zero_grad()
        gen = torch.Generator().manual_seed(7)
        out = model.render_rays(o, d, 1.5, 4.5, perturb=perturb, background=bg, generator=gen)
        cot = {k: torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).reshape(v.shape) for k, v in out.items()}
        loss = sum((v * cot[k]).sum() for k, v in out.items())
        loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    for perturb in (False, True):
        out, grads = run(perturb)
        with monkeypatch.context() as mp:
            mp.setattr(nerf_module, "volume_render", _dense_volume_render)
            ref, ref_grads = run(perturb)
        for k in ref:
            testing.assert_close(out[k], ref[k], "reduction", name=k)
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            testing.assert_close(a, b, "reduction", name=f"grad {i}")


def test_model_uses_volume_render(g, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return pyeccv.volume_render(*args, **kwargs)

    monkeypatch.setattr(nerf_module, "volume_render", spy)
    o, d = _rays(3, g)
    NeRF(**TINY).render_rays(o, d, 2.0, 4.0, perturb=False, background=torch.zeros(3))
    assert len(calls) == 2 and calls[0]["return_weights"] and calls[1]["background"] is not None


# ---- the example: exact scene renderer, and a short run ---------------------------------------
def _brute_force(scene, o, d, near, far, bg, n):
    """Midpoint quadrature with n points per ray: the dense compositing formula on a fine grid."""
    edges = torch.linspace(near, far, n + 1, dtype=torch.float64)
    t = 0.5 * (edges[1:] + edges[:-1])
    out = []
    for s in range(0, o.shape[0], 8):
        pts = o[s:s + 8, None, :] + d[s:s + 8, None, :] * t[:, None]
        sigma, rgb = scene.query(pts)
        dt = (edges[1] - edges[0]) * d[s:s + 8].norm(dim=-1, keepdim=True)
        tau = sigma * dt
        w = torch.exp(-(torch.cumsum(tau, -1) - tau)) * (1 - torch.exp(-tau))
        out.append((w[..., None] * rgb).sum(1) + torch.exp(-tau.sum(-1, keepdim=True)) * bg)
    return torch.cat(out)


def test_analytic_scene_matches_brute_force_quadrature(g):
    scene = example.Scene()
    poses = example.camera_poses(2, 3.0, g)
    o, d = example.camera_rays(poses, 6, 40.0)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    d = d * (0.5 + torch.rand(d.shape[0], 1, generator=g, dtype=torch.float64))  # not unit: t scales
    bg = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    exact = scene.render(o, d, 0.7, 8.0, bg)
    approx = _brute_force(scene, o, d, 0.7, 8.0, bg, 40_000)
    assert float((exact - approx).abs().max()) < 1e-3  # midpoint rule: O(sigma dt) at each boundary
    assert float((exact - bg).abs().amax(-1).max()) > 0.3  # the views do see the objects


def test_analytic_scene_single_sphere_by_hand():
    sigma, r = 3.0, 0.5
    scene = example.Scene([("sphere", (0.0, 0.0, 0.0), r, sigma, (1.0, 0.0, 0.0))])
    o = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.3, -2.0], [0.0, 0.6, -2.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=torch.float64)
    rgb = scene.render(o, d, 0.0, 4.0, torch.zeros(3, dtype=torch.float64))
    chord = 2 * torch.sqrt(torch.tensor([r * r, r * r - 0.09, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rgb[:, 0], 1 - torch.exp(-sigma * chord))
    assert float(rgb[:, 1:].abs().max()) == 0.0


def _read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    return w, h


def test_example_short_run_writes_png(tmp_path):
    res = example.main(["--steps", "3", "--size", "8", "--views", "3", "--test-views", "2", "--batch", "64",
                        "--device", "cpu", "--out", str(tmp_path)])
    assert res["steps"] == 3 and math.isfinite(res["psnr"]) and math.isfinite(res["psnr_coarse"])
    assert res["png"].startswith(str(tmp_path))
    assert _read_png(res["png"]) == (16 * 4, 8 * 4)  # NeRF | ground truth, side by side, 4x nearest


def test_example_time_budget_still_evaluates(tmp_path):
    out = str(tmp_path / "view.png")
    res = example.main(["--steps", "1000", "--size", "6", "--views", "2", "--test-views", "1", "--batch", "16",
                        "--time-budget", "0", "--png-scale", "1", "--out", out])
    assert res["steps"] == 0 and res["png"] == out and math.isfinite(res["psnr"])
    assert _read_png(out) == (12, 6)
