"""The CondInst references against each other and against hand-computed values: the official
grouped-conv path (pyeccv.reference.cond_mask_head) vs the per-instance loop, aligned_bilinear vs
its formula, dice_coefficient vs its definition."""
import math

import pytest
import torch

from pyeccv import testing
from pyeccv.reference import cond_mask_head as ref

SOI = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0])


def make(N, C, H, W, I, num_layers, channels, rel_coords, g, dtype=torch.float64, stride=8):
    P = sum(map(sum, ref.weight_and_bias_nums(C, channels, num_layers, rel_coords)))
    feats = testing.randn(N, C, H, W, g=g, dtype=dtype)
    params = testing.randn(I, P, g=g, dtype=dtype) * 0.5
    im_inds = torch.randint(0, N, (I,), generator=g)
    # instance locations anywhere in (and a little outside) the image, float32 like the official ones
    locations = testing.rand(I, 2, g=g, low=-10.0, high=stride * max(H, W) + 10.0, dtype=torch.float32)
    soi = SOI[torch.randint(0, 5, (I,), generator=g)]
    return feats, params, im_inds, locations, soi


# (N, C, H, W, I, num_layers, channels): I in {0, 1, 7}, odd and even maps, several images
CASES = [(1, 8, 5, 7, 1, 3, 8), (3, 8, 6, 4, 7, 3, 8), (2, 8, 9, 10, 7, 2, 16), (4, 5, 3, 3, 7, 4, 8),
         (2, 8, 1, 1, 0, 3, 8), (2, 16, 7, 8, 1, 4, 16), (3, 8, 4, 9, 0, 2, 8), (1, 3, 2, 13, 7, 2, 8)]


@pytest.mark.parametrize("rel_coords", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop(case, rel_coords, g):
    N, C, H, W, I, L, ch = case
    feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, ch, rel_coords, g)
    feats.requires_grad_()
    params.requires_grad_()
    kw = dict(feat_stride=8, num_layers=L, channels=ch, rel_coords=rel_coords)
    out = ref.cond_mask_head(feats, params, im_inds, locations, soi, **kw)
    want = ref.loop_cond_mask_head(feats, params, im_inds, locations, soi, **kw)
    assert out.shape == (I, H, W) and out.dtype == torch.float64
    testing.assert_close(out, want, "reduction")
    if I == 0:
        return
    cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
    gf, gp = torch.autograd.grad(out, (feats, params), cot)
    wf, wp = torch.autograd.grad(want, (feats, params), cot)
    testing.assert_close(gf, wf, "reduction", name="d mask_feats")
    testing.assert_close(gp, wp, "reduction", name="d params")


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_reference_float32_and_stride(stride, g):
    feats, params, im_inds, locations, soi = make(2, 8, 6, 5, 7, 3, 8, True, g, dtype=torch.float32, stride=stride)
    kw = dict(feat_stride=stride, num_layers=3, channels=8, rel_coords=True)
    out = ref.cond_mask_head(feats, params, im_inds, locations, soi, **kw)
    assert out.dtype == torch.float32
    want = ref.loop_cond_mask_head(feats.double(), params.double(), im_inds, locations, soi, **kw)
    testing.assert_close(out, want, "reduction", dtype=torch.float32)


def test_hand_computed_rel_coords_and_layout():
    # C=1, H=1, W=2, stride 8: centres x = 4, 12, y = 4. Instance at (100, 50), soi 64:
    # rel_x = 1.5, 1.375; rel_y = 0.71875. Layer 0 copies (rel_x, rel_y) to its 2 channels, layer 1
    # takes rel_x + 10 rel_y + 0.5. Weights first (layer 0 [out][in] then layer 1), biases after.
    w0 = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    w1 = [1.0, 10.0]
    b0, b1 = [0.0, 0.0], [0.5]
    params = torch.tensor([w0 + w1 + b0 + b1], dtype=torch.float64)
    feats = torch.tensor([[[[3.0, 2.0]]]], dtype=torch.float64)
    args = (feats, params, torch.tensor([0]), torch.tensor([[100.0, 50.0]]), torch.tensor([64.0]))
    kw = dict(feat_stride=8, num_layers=2, channels=2, rel_coords=True)
    want = torch.tensor([[[9.1875, 9.0625]]], dtype=torch.float64)
    assert torch.equal(ref.cond_mask_head(*args, **kw), want)
    assert torch.equal(ref.loop_cond_mask_head(*args, **kw), want)
    # the feature channel comes after the two coordinate channels
    params[0, 2] = 1.0  # layer 0, out 0, in 2 = the feature
    want = want + torch.tensor([[[3.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(ref.cond_mask_head(*args, **kw), want, rtol=0, atol=0)
    torch.testing.assert_close(ref.loop_cond_mask_head(*args, **kw), want, rtol=0, atol=0)


def test_weight_and_bias_nums():
    assert ref.weight_and_bias_nums(8, 8, 3, True) == ([80, 64, 8], [8, 8, 1])
    assert sum(map(sum, ref.weight_and_bias_nums(8, 8, 3, True))) == 169
    assert ref.weight_and_bias_nums(8, 8, 3, False) == ([64, 64, 8], [8, 8, 1])
    assert ref.weight_and_bias_nums(8, 16, 2, True) == ([160, 16], [16, 1])
    assert ref.weight_and_bias_nums(8, 8, 4, True) == ([80, 64, 64, 8], [8, 8, 8, 1])
    with pytest.raises(ValueError, match="num_layers"):
        ref.weight_and_bias_nums(8, 8, 1, True)


def test_parse_dynamic_params_shapes(g):
    wn, bn = ref.weight_and_bias_nums(8, 8, 3, True)
    params = testing.randn(5, 169, g=g)
    ws, bs = ref.parse_dynamic_params(params, 8, wn, bn)
    assert [tuple(w.shape) for w in ws] == [(40, 10, 1, 1), (40, 8, 1, 1), (5, 8, 1, 1)]
    assert [tuple(b.shape) for b in bs] == [(40,), (40,), (5,)]
    # instance 1, layer 0, out channel 3, in channel 4 lives at 3 * 10 + 4; its bias at 152 + 3
    assert ws[0][1 * 8 + 3, 4, 0, 0] == params[1, 34]
    assert bs[0][1 * 8 + 3] == params[1, 152 + 3]
    assert bs[2][1] == params[1, 168]


def test_wrong_param_count_raises(g):
    feats, params, im_inds, locations, soi = make(1, 8, 3, 3, 2, 3, 8, True, g)
    with pytest.raises(ValueError, match="params"):
        ref.cond_mask_head(feats, params[:, :-1], im_inds, locations, soi)


def test_compute_locations():
    loc = ref.compute_locations(2, 3, 8, "cpu")
    assert loc.dtype == torch.float32
    want = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]], dtype=torch.float32)
    assert torch.equal(loc, want)
    assert torch.equal(ref.compute_locations(1, 2, 5, "cpu"), torch.tensor([[2.0, 2.0], [7.0, 2.0]]))


def direct_aligned_bilinear(x, f):
    """The formula: output pixel k samples input coordinate max(k - f // 2, 0) / f of the input
    padded with one replicated row / column at the end; bilinear, separable."""
    N, C, H, W = x.shape
    xp = torch.cat([x, x[:, :, -1:]], 2)
    xp = torch.cat([xp, xp[:, :, :, -1:]], 3)
    out = torch.empty(N, C, H * f, W * f, dtype=x.dtype)

    def taps(k, n):
        s = max(k - f // 2, 0) / f
        i0 = math.floor(s)
        t = s - i0
        return i0, min(i0 + 1, n), t

    for k in range(H * f):
        i0, i1, ti = taps(k, H)
        for m in range(W * f):
            j0, j1, tj = taps(m, W)
            out[:, :, k, m] = ((1 - ti) * (1 - tj) * xp[:, :, i0, j0] + (1 - ti) * tj * xp[:, :, i0, j1]
                               + ti * (1 - tj) * xp[:, :, i1, j0] + ti * tj * xp[:, :, i1, j1])
    return out


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hw", [(3, 4), (1, 1), (2, 5)])
def test_aligned_bilinear_formula(factor, hw, g):
    x = testing.randn(2, 3, *hw, g=g, dtype=torch.float64)
    out = ref.aligned_bilinear(x, factor)
    assert out.shape == (2, 3, hw[0] * factor, hw[1] * factor)
    testing.assert_close(out, direct_aligned_bilinear(x, factor), "elementwise")
    if factor == 1:
        assert out is x


def test_aligned_bilinear_tiny_by_hand():
    # 1-D view (H = 1 after the replicated pad the rows are equal): x = [0, 4], factor 2 -> output
    # pixels sample 0, 0, 0.5, 1 of [0, 4, 4] -> [0, 0, 2, 4]
    x = torch.tensor([[[[0.0, 4.0]]]], dtype=torch.float64)
    out = ref.aligned_bilinear(x, 2)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.0, 2.0, 4.0]] * 2]], dtype=torch.float64))


def test_dice_coefficient(g):
    x = testing.rand(4, 1, 5, 6, g=g, dtype=torch.float64)
    t = (testing.rand(4, 1, 5, 6, g=g, dtype=torch.float64) > 0.5).double()
    got = ref.dice_coefficient(x, t)
    assert got.shape == (4,)
    for i in range(4):
        a, b = x[i].flatten(), t[i].flatten()
        want = 1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum() + 1e-5)
        torch.testing.assert_close(got[i], want, rtol=1e-14, atol=0)
    # a perfect prediction of a non-empty mask costs ~0; an empty one against an empty mask 1 - 0 = 1
    assert float(ref.dice_coefficient(t, t).max()) < 1e-5
    z = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert float(ref.dice_coefficient(z, z)[0]) == 1.0
