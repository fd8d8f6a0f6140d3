"""CondInst's dynamic mask head: the op (native C++ and Triton under the interpreter) against
AdelaiDet's grouped-conv path (pyeccv.reference.cond_mask_head) and the per-instance loop, forward
and gradients (mask_feats, params) for odd and even maps, several images (some without instances),
0, 1, 7 and 500 instances, relative coordinates on and off, 2-4 layers, 8/16 (and an odd number of)
channels, power-of-two and other feature channels; float64, float32 and bf16/fp16 features;
gradcheck; determinism; opcheck; torch.compile; bad inputs; GPU against the native CPU path."""
import contextlib

import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.reference import cond_mask_head as ref

SOI = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0])


backends = testing.backends
device_of = testing.device_of


# ---- inputs ---------------------------------------------------------------------------------------
def make(N, C, H, W, I, L, ch, rel, g, dtype=torch.float64, stride=8, params_dtype=None):
    """Random features and params; im_inds skip image N // 2 when N > 1 (an image without
    instances); locations anywhere in (and a little outside) the image, float32 like the official
    ones; soi one of the FPN sizes of interest."""
    P = pyeccv.num_gen_params(C, ch, L, rel)
    feats = testing.randn(N, C, H, W, g=g, dtype=dtype)
    params = (testing.randn(I, P, g=g, dtype=torch.float64) * 0.5).to(params_dtype or dtype)
    im_inds = torch.randint(0, N, (I,), generator=g)
    if N > 1:
        im_inds = torch.where(im_inds == N // 2, (im_inds + 1) % N, im_inds)
    locations = testing.rand(I, 2, g=g, low=-10.0, high=stride * max(H, W) + 10.0, dtype=torch.float32)
    soi = SOI[torch.randint(0, 5, (I,), generator=g)]
    return feats, params, im_inds, locations, soi


def run_op(backend, feats, params, im_inds, locations, soi, cot=None, **kw):
    """The public op on the backend's device; logits and (d_feats, d_params) of sum(cot * logits),
    all on the CPU."""
    dev = device_of(backend)
    f = feats.detach().to(dev).requires_grad_()
    p = params.detach().to(dev).requires_grad_()
    out = pyeccv.cond_mask_head(f, p, im_inds.to(dev), locations.to(dev), soi.to(dev), backend=backend, **kw)
    grads = None
    if cot is not None:
        grads = [x.cpu() for x in torch.autograd.grad((out.to(torch.float64) * cot.to(dev)).sum(), (f, p))]
    return out.detach().cpu(), grads


@contextlib.contextmanager
def one_thread():
    """The grouped conv2d backward with hundreds of groups runs hundreds of tiny OpenMP regions; on a
    loaded 2-core machine the second thread's barrier waits made it up to ~200x slower (0.1 s -> 24 s),
    so the reference runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_ref(feats, params, im_inds, locations, soi, cot=None, loop=False, **kw):
    """The official grouped-conv path (or the loop) in float64 on the values the op saw."""
    f = feats.detach().to(torch.float64).requires_grad_()
    p = params.detach().to(torch.float64).requires_grad_()
    fn = ref.loop_cond_mask_head if loop else ref.cond_mask_head
    with one_thread():
        out = fn(f, p, im_inds, locations, soi, **kw)
        grads = list(torch.autograd.grad((out * cot).sum(), (f, p))) if cot is not None and out.numel() else None
    if cot is not None and grads is None:
        grads = [torch.zeros_like(f), torch.zeros_like(p)]
    return out.detach(), grads


def check(got, ggot, want, gwant, dtype, what, im_inds, N, grad_kind="reduction"):
    """Logits and gradients within the tolerance of the feature dtype (the params gradient too: with
    bf16 features and float32 params its error is the features'); zero d mask_feats for images
    without instances."""
    testing.assert_close(got, want, "reduction", dtype, name=f"logits {what}")
    testing.assert_close(ggot[0], gwant[0], grad_kind, dtype, name=f"d mask_feats {what}")
    testing.assert_close(ggot[1], gwant[1], grad_kind, dtype, name=f"d params {what}")
    unused = torch.ones(N, dtype=torch.bool)
    unused[im_inds.long()] = False
    assert bool((ggot[0][unused] == 0).all()), f"d mask_feats of images without instances must be 0 ({what})"
    assert bool(torch.isfinite(got).all()) and all(bool(torch.isfinite(x).all()) for x in ggot)


# (N, C, H, W, I, num_layers, channels, feat_stride): I in {0, 1, 7}, odd and even maps, several
# images (image N // 2 without instances), 2-4 layers, 8 / 16 / 5 channels, C = 8, 16 and 5, 3, 12
CASES = [(1, 8, 5, 7, 1, 3, 8, 8), (3, 8, 6, 4, 7, 3, 8, 8), (2, 8, 9, 10, 7, 2, 16, 4), (4, 5, 3, 3, 7, 4, 8, 16),
         (2, 8, 1, 1, 0, 3, 8, 8), (2, 16, 7, 8, 1, 4, 16, 8), (3, 8, 4, 9, 0, 2, 8, 8), (1, 3, 2, 13, 7, 2, 8, 5),
         (2, 12, 8, 6, 7, 3, 5, 8)]


def triton_cases(dtype, rel_coords):
    """The interpreter costs ~0.15 s per instance: the cases with I <= 1, and those with I = 7 shared
    out over the four (dtype, rel_coords) parametrizations."""
    seven = [c for c in CASES if c[4] == 7]
    return [c for c in CASES if c[4] <= 1] + seven[2 * (dtype == torch.float32) + bool(rel_coords)::4]


# ---- against the reference --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rel_coords", [True, False])
def test_matches_reference(backend, dtype, rel_coords, g):
    for k, case in enumerate(CASES if backend == "native" else triton_cases(dtype, rel_coords)):
        N, C, H, W, I, L, ch, stride = case
        feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, ch, rel_coords, g, dtype, stride)
        if k % 3 == 1:  # int32 image indices, float64 locations / soi (used in float32)
            im_inds, locations, soi = im_inds.int(), locations.double(), soi.double()
        cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
        kw = dict(feat_stride=stride, num_layers=L, channels=ch, rel_coords=rel_coords)
        with testing.poisoned():
            got, ggot = run_op(backend, feats, params, im_inds, locations, soi, cot, **kw)
        want, gwant = run_ref(feats, params, im_inds, locations, soi, cot, **kw)
        assert got.shape == (I, H, W) and got.dtype == dtype
        assert ggot[0].dtype == dtype and ggot[1].dtype == dtype and ggot[1].shape == params.shape
        check(got, ggot, want, gwant, dtype, f"case={case} rel={rel_coords}", im_inds, N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_instances_native(dtype, g):
    """500 instances on 3 images of a 6 x 5 map (one image without instances), against the official
    path (and, without relative coordinates, the loop)."""
    N, C, H, W, I = 3, 8, 6, 5, 500
    for rel_coords, L in ((True, 3), (False, 2)):
        feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, 8, rel_coords, g, dtype)
        cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
        kw = dict(num_layers=L, rel_coords=rel_coords)
        with testing.poisoned():
            got, ggot = run_op("native", feats, params, im_inds, locations, soi, cot, **kw)
        want, gwant = run_ref(feats, params, im_inds, locations, soi, cot, **kw)
        check(got, ggot, want, gwant, dtype, f"I=500 rel={rel_coords}", im_inds, N)
        if not rel_coords:
            loop, _ = run_ref(feats, params, im_inds, locations, soi, loop=True, **kw)
            testing.assert_close(got, loop, "reduction", dtype, name="logits vs loop")


@pytest.mark.parametrize("backend", backends())
def test_hand_computed_layout(backend):
    """C=1, H=1, W=2, stride 8: centres x = 4, 12, y = 4; an instance at (100, 50) with soi 64 has
    rel_x = 1.5, 1.375 and rel_y = 0.71875. Layer 0 copies (rel_x, rel_y), layer 1 takes
    rel_x + 10 rel_y + 0.5; then the feature channel (after the two coordinates) is added."""
    dev = device_of(backend)
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0] + [1.0, 10.0] + [0.0, 0.0] + [0.5]], dtype=torch.float64)
    feats = torch.tensor([[[[3.0, 2.0]]]], dtype=torch.float64)
    args = [feats, params, torch.tensor([0]), torch.tensor([[100.0, 50.0]]), torch.tensor([64.0])]
    kw = dict(feat_stride=8, num_layers=2, channels=2, backend=backend)
    want = torch.tensor([[[9.1875, 9.0625]]], dtype=torch.float64)
    assert torch.equal(pyeccv.cond_mask_head(*[a.to(dev) for a in args], **kw).cpu(), want)
    args[1] = params.clone()
    args[1][0, 2] = 1.0  # layer 0, out 0, in 2 = the feature
    got = pyeccv.cond_mask_head(*[a.to(dev) for a in args], **kw).cpu()
    assert torch.equal(got, want + torch.tensor([[[3.0, 2.0]]], dtype=torch.float64))


@pytest.mark.parametrize("backend", backends())
def test_non_contiguous_inputs(backend, g):
    dev = device_of(backend)
    N, C, H, W, I = 2, 8, 5, 4, 3
    feats, params, im_inds, locations, soi = make(N, C, H, W, I, 3, 8, True, g)
    f = feats.to(dev).contiguous(memory_format=torch.channels_last)
    p = params.t().contiguous().t().to(dev)  # column-major (I, P)
    loc = torch.stack([locations[:, 0], soi, locations[:, 1]], 1)[:, ::2]  # strided (I, 2)
    assert not loc.is_contiguous() and not p.is_contiguous()
    got = pyeccv.cond_mask_head(f, p, im_inds.to(dev), loc.to(dev), soi.to(dev), backend=backend).cpu()
    want = ref.cond_mask_head(feats, params, im_inds, locations, soi)
    testing.assert_close(got, want, "reduction")


# ---- half precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features(backend, dtype, g):
    """bf16 / fp16 features: logits and d mask_feats in the feature dtype, d params in the params
    dtype; against float64 on the rounded inputs (the official bf16 graph rounds every layer)."""
    cases = [(3, 8, 6, 7, 7, 3, 8), (2, 5, 4, 4, 1, 2, 16)] if backend == "native" else [(2, 8, 4, 5, 3, 3, 8)]
    for params_dtype in (dtype, torch.float32):
        for N, C, H, W, I, L, ch in cases:
            feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, ch, True, g, dtype,
                                                          params_dtype=params_dtype)
            cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
            kw = dict(num_layers=L, channels=ch)
            got, ggot = run_op(backend, feats, params, im_inds, locations, soi, cot, **kw)
            want, gwant = run_ref(feats, params, im_inds, locations, soi, cot, **kw)
            assert got.dtype == dtype and ggot[0].dtype == dtype and ggot[1].dtype == params_dtype
            check(got, ggot, want, gwant, dtype, f"{dtype} params {params_dtype} I={I}", im_inds, N,
                  grad_kind="gated-grad")


# ---- gradcheck ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("rel_coords", [True, False])
def test_gradcheck(backend, rel_coords, g):
    dev = device_of(backend)
    N, C, H, W, I, L, ch = (3, 3, 3, 2, 4, 3, 4) if backend == "native" else (2, 3, 2, 3, 2, 2, 3)
    feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, ch, rel_coords, g)
    im_inds, locations, soi = im_inds.to(dev), locations.to(dev), soi.to(dev)
    args = (feats.to(dev).requires_grad_(), params.to(dev).requires_grad_())
    # the interpreter checks one random projection of the Jacobian (fast_mode), the native op all of it
    assert torch.autograd.gradcheck(
        lambda f, p: pyeccv.cond_mask_head(f, p, im_inds, locations, soi, num_layers=L, channels=ch,
                                           rel_coords=rel_coords, backend=backend), args, eps=1e-6, atol=1e-7,
        fast_mode=backend == "triton")


# ---- determinism --------------------------------------------------------------------------------------
def test_native_backward_is_deterministic(g):
    """Two backward calls give bit-identical gradients (many instances on few images: the d mask_feats
    sums over instances of one image)."""
    N, C, H, W, I = 2, 8, 9, 10, 96
    feats, params, im_inds, locations, soi = make(N, C, H, W, I, 3, 8, True, g, torch.float32)
    cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
    first = run_op("native", feats, params, im_inds, locations, soi, cot)
    for _ in range(2):
        again = run_op("native", feats, params, im_inds, locations, soi, cot)
        assert torch.equal(first[0], again[0])
        assert torch.equal(first[1][0], again[1][0]) and torch.equal(first[1][1], again[1][1])


@pytest.mark.skipif(testing.triton_device() is None, reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_deterministic_flag(deterministic, g):
    """deterministic=False may reduce with atomics: same values up to the float32 sum order;
    deterministic=True repeats bit for bit."""
    N, C, H, W, I = 3, 8, 5, 6, 5
    feats, params, im_inds, locations, soi = make(N, C, H, W, I, 3, 8, True, g, torch.float32)
    cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
    with testing.poisoned():
        got, ggot = run_op("triton", feats, params, im_inds, locations, soi, cot, deterministic=deterministic)
    want, gwant = run_ref(feats, params, im_inds, locations, soi, cot)
    check(got, ggot, want, gwant, torch.float32, f"deterministic={deterministic}", im_inds, N)
    if deterministic:
        again, gagain = run_op("triton", feats, params, im_inds, locations, soi, cot, deterministic=True)
        assert torch.equal(got, again) and torch.equal(ggot[0], gagain[0]) and torch.equal(ggot[1], gagain[1])


@pytest.mark.parametrize("backend", backends())
def test_no_instances_and_all_images_empty(backend, g):
    """I = 0: an empty (0, H, W) output, zero gradients of the right shapes."""
    dev = device_of(backend)
    feats, params, im_inds, locations, soi = make(2, 8, 3, 4, 0, 3, 8, True, g, torch.float32)
    f, p = feats.to(dev).requires_grad_(), params.to(dev).requires_grad_()
    out = pyeccv.cond_mask_head(f, p, im_inds.to(dev), locations.to(dev), soi.to(dev), backend=backend)
    assert out.shape == (0, 3, 4) and out.dtype == torch.float32
    df, dp = torch.autograd.grad(out.sum(), (f, p))
    assert df.shape == f.shape and bool((df == 0).all()) and dp.shape == (0, p.shape[1])


# ---- num_gen_params -----------------------------------------------------------------------------------
def test_num_gen_params():
    assert pyeccv.num_gen_params(8) == 169  # AdelaiDet's defaults: 80 + 64 + 8 weights, 8 + 8 + 1 biases
    assert pyeccv.num_gen_params() == 169
    for C, ch, L, rel in ((8, 8, 2, True), (8, 16, 4, True), (5, 8, 3, False), (16, 5, 3, True), (1, 1, 2, False)):
        w, b = ref.weight_and_bias_nums(C, ch, L, rel)
        assert pyeccv.num_gen_params(C, ch, L, rel) == sum(w) + sum(b)
    for L in (0, 1):
        with pytest.raises(ValueError, match="num_layers"):
            pyeccv.num_gen_params(8, 8, L)


# ---- opcheck and torch.compile -------------------------------------------------------------------------
def test_opcheck(g):
    ops = torch.ops.pyeccv
    for dtype, rel_coords, I in ((torch.float32, True, 5), (torch.float64, False, 0)):
        N, C, H, W, L = 2, 5, 3, 4, 2
        feats, params, im_inds, locations, soi = make(N, C, H, W, I, L, 8, rel_coords, g, dtype)
        rest = (8, L, 8, rel_coords, True, "auto")
        testing.opcheck(ops.cond_mask_head_fwd.default, (feats.clone().requires_grad_(),
                                                         params.clone().requires_grad_(), im_inds, locations, soi)
                        + rest)
        testing.opcheck(ops.cond_mask_head_bwd.default, (testing.randn(I, H, W, g=g, dtype=dtype), feats, params,
                                                         im_inds, locations, soi) + rest, skip_autograd=True)


def test_compile_fullgraph_with_backward(g):
    """A controller (linear layer on per-instance features), the head and a sigmoid loss in one graph;
    forward and gradients equal to eager."""
    N, C, H, W, I = 2, 8, 5, 6, 4
    feats, _, im_inds, locations, soi = make(N, C, H, W, I, 3, 8, True, g, torch.float32)
    inst = testing.randn(I, 16, g=g)
    w = (testing.randn(16, pyeccv.num_gen_params(C), g=g) * 0.2).requires_grad_()
    f = feats.requires_grad_()

    def fn(mf, wc):
        logits = pyeccv.cond_mask_head(mf, inst @ wc, im_inds, locations, soi)
        return torch.sigmoid(logits).square().mean()

    got = testing.compile_check(fn, f, w)
    want = fn(f, w)
    for a, b in zip(torch.autograd.grad(got, (f, w)), torch.autograd.grad(want, (f, w))):
        torch.testing.assert_close(a, b)


# ---- bad inputs -----------------------------------------------------------------------------------------
def test_bad_inputs():
    N, C, H, W, I = 2, 8, 3, 4, 3
    f = torch.randn(N, C, H, W)
    p = torch.randn(I, 169)
    ii = torch.tensor([0, 1, 1])
    loc = torch.rand(I, 2) * 32
    soi = torch.full((I,), 64.0)
    head = pyeccv.cond_mask_head
    # P != num_gen_params
    for bad, kw in ((torch.randn(I, 168), {}), (p, dict(rel_coords=False)), (p, dict(num_layers=4)),
                    (p, dict(channels=16)), (torch.randn(I, 153), {})):
        with pytest.raises(ValueError, match="params must have num_gen_params = "):
            head(f, bad, ii, loc, soi, **kw)
    with pytest.raises(ValueError, match="params must be 2-D"):
        head(f, p[0], ii, loc, soi)
    # im_inds out of range, wrong dtype or shape
    for bad, i in (([0, 2, 1], 1), ([0, 1, -1], 2), ([5, 0, 0], 0)):
        with pytest.raises(ValueError, match=rf"im_inds\[{i}\] = {bad[i]} is out of range for 2 images"):
            head(f, p, torch.tensor(bad), loc, soi)
    for bad in (ii.float(), ii.bool(), ii[:2], torch.tensor([0, 1, 1, 0])):
        with pytest.raises(ValueError, match=r"im_inds must be an integer tensor of shape \(3,\)"):
            head(f, p, bad, loc, soi)
    with pytest.raises(ValueError, match="im_inds must be 1-D"):
        head(f, p, ii[None], loc, soi)
    # locations / soi shape and dtype
    for bad in (torch.rand(I, 3), torch.rand(I + 1, 2), torch.rand(I * 2), torch.rand(2, I)):
        with pytest.raises(ValueError, match=r"locations must have shape \(3, 2\)"):
            head(f, p, ii, bad, soi)
    for bad in (torch.rand(I + 1), torch.rand(I, 1), torch.rand(1)):
        with pytest.raises(ValueError, match=r"soi must have shape \(3,?\)"):
            head(f, p, ii, loc, bad)
    with pytest.raises(ValueError, match="locations must have dtype in"):
        head(f, p, ii, loc.long(), soi)
    with pytest.raises(ValueError, match="soi must have dtype in"):
        head(f, p, ii, loc, soi.long())
    # soi <= 0
    for v in (0.0, -64.0):
        bad = soi.clone()
        bad[1] = v
        with pytest.raises(ValueError, match="soi must be positive"):
            head(f, p, ii, loc, bad)
    # dtypes / devices that disagree
    with pytest.raises(ValueError, match="mask_feats must have dtype in"):
        head(f.long(), p, ii, loc, soi)
    with pytest.raises(ValueError, match="params must have dtype in"):
        head(f, p.long(), ii, loc, soi)
    with pytest.raises(ValueError, match="mask_feats must be 4-D"):
        head(f[0], p, ii, loc, soi)
    for name, args in (("params", (f, p.to("meta"), ii, loc, soi)), ("im_inds", (f, p, ii.to("meta"), loc, soi)),
                       ("locations", (f, p, ii, loc.to("meta"), soi)), ("soi", (f, p, ii, loc, soi.to("meta")))):
        with pytest.raises(ValueError, match=f"{name} must be on cpu"):
            head(*args)
    # network shape, stride, backend
    for L in (1, 0, -1):
        with pytest.raises(ValueError, match="num_layers must be an int >= 2"):
            head(f, p, ii, loc, soi, num_layers=L)
    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        head(f, p, ii, loc, soi, channels=0)
    for bad in (8.0, "8", True, None):
        with pytest.raises(ValueError, match="feat_stride must be an int"):
            head(f, p, ii, loc, soi, feat_stride=bad)
    for bad in (0, -8):
        with pytest.raises(ValueError, match="feat_stride must be a positive int"):
            head(f, p, ii, loc, soi, feat_stride=bad)
    with pytest.raises(ValueError, match="num_layers must be an int"):
        head(f, p, ii, loc, soi, num_layers=3.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        head(f, p, ii, loc, soi, backend="cuda")
    with pytest.raises(ValueError, match="reference"):
        head(f, p, ii, loc, soi, backend="reference")


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_matches_native(deterministic, g):
    """CondInst sizes (800 x 1088 images at stride 8: 100 x 136 maps) on the GPU against the native
    CPU path (float32) and the reference (float64, a smaller map)."""
    for N, H, W, I, L, rel_coords in ((2, 100, 136, 97, 3, True), (4, 37, 50, 500, 3, True),
                                      (3, 25, 34, 1, 4, False), (2, 13, 9, 0, 2, True)):
        feats, params, im_inds, locations, soi = make(N, 8, H, W, I, L, 8, rel_coords, g, torch.float32)
        cot = testing.randn(I, H, W, g=g, dtype=torch.float64)
        kw = dict(num_layers=L, rel_coords=rel_coords)
        want, gwant = run_op("native", feats, params, im_inds, locations, soi, cot, **kw)
        f, p = feats.cuda().requires_grad_(), params.cuda().requires_grad_()
        with testing.poisoned():
            out = pyeccv.cond_mask_head(f, p, im_inds.cuda(), locations.cuda(), soi.cuda(),
                                        deterministic=deterministic, **kw)
            got_g = torch.autograd.grad((out.double() * cot.cuda()).sum(), (f, p)) if I else \
                (torch.zeros_like(f), torch.zeros_like(p))
        got, ggot = out.detach().cpu(), [x.cpu() for x in got_g]
        check(got, ggot, want, gwant, torch.float32, f"cuda N={N} {H}x{W} I={I}", im_inds, N)
        if deterministic and I:
            out2 = pyeccv.cond_mask_head(f, p, im_inds.cuda(), locations.cuda(), soi.cuda(), **kw)
            again = torch.autograd.grad((out2.double() * cot.cuda()).sum(), (f, p))
            assert torch.equal(out.detach(), out2.detach())
            assert all(torch.equal(a, b) for a, b in zip(got_g, again)), "deterministic GPU backward differs"
    # float64 on the GPU against the official path
    feats, params, im_inds, locations, soi = make(3, 16, 19, 24, 33, 3, 16, True, g, torch.float64)
    cot = testing.randn(33, 19, 24, g=g, dtype=torch.float64)
    f, p = feats.cuda().requires_grad_(), params.cuda().requires_grad_()
    out = pyeccv.cond_mask_head(f, p, im_inds.cuda(), locations.cuda(), soi.cuda(), channels=16,
                                deterministic=deterministic)
    ggot = [x.cpu() for x in torch.autograd.grad((out * cot.cuda()).sum(), (f, p))]
    want, gwant = run_ref(feats, params, im_inds, locations, soi, cot, channels=16)
    check(out.detach().cpu(), ggot, want, gwant, torch.float64, "cuda float64", im_inds, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype, g):
    feats, params, im_inds, locations, soi = make(2, 8, 100, 136, 50, 3, 8, True, g, dtype,
                                                  params_dtype=torch.float32)
    cot = testing.randn(50, 100, 136, g=g, dtype=torch.float64)
    f, p = feats.cuda().requires_grad_(), params.cuda().requires_grad_()
    out = pyeccv.cond_mask_head(f, p, im_inds.cuda(), locations.cuda(), soi.cuda())
    ggot = [x.cpu() for x in torch.autograd.grad((out.double() * cot.cuda()).sum(), (f, p))]
    want, gwant = run_ref(feats, params, im_inds, locations, soi, cot)
    assert out.dtype == dtype and ggot[0].dtype == dtype and ggot[1].dtype == torch.float32
    check(out.detach().cpu(), ggot, want, gwant, dtype, f"cuda {dtype}", im_inds, 2)
