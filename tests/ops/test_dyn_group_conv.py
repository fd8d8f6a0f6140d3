"""Dynamic Group Convolution: the op (torch gather path) against the official masked computation
(pyeccv.reference.dyn_group_conv), forward and gradients (x, weight, saliency) for 1x1 and 3x3
(and non-square) kernels, stride 1/2, padding, dilation, 1/2/4 heads, keep from 1 to C_in, B = 1
and odd sizes, tied saliencies (the official rule drops every tie at the threshold), zero
saliencies; float64, float32 and bf16; that only kept channels reach the convolution; gradcheck;
opcheck; torch.compile; bad inputs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyeccv
from pyeccv import testing
from pyeccv.ops import dyn_group_conv as ops
from pyeccv.reference import dyn_group_conv as ref

# (B, C_in, C_out, H, W, k, heads, keep, stride, padding, dilation)
CASES = [
    (2, 8, 8, 7, 5, 3, 4, 3, 1, 1, 1),
    (1, 5, 6, 9, 9, 3, 2, 5, 2, 2, 2),
    (3, 6, 4, 4, 6, 1, 1, 1, 1, 0, 1),
    (1, 1, 3, 5, 3, 3, 1, 1, 1, 1, 1),
    (2, 13, 12, 5, 7, 3, 4, 7, 2, 1, 1),
    (3, 7, 14, 6, 5, 1, 2, 6, 2, 0, 1),
    (1, 16, 8, 8, 8, 3, 4, 4, 1, 2, 2),
    (2, 9, 4, 11, 3, 3, 4, 9, 1, (1, 0), 1),
    (5, 4, 4, 3, 3, 3, 2, 2, 1, 0, 1),
    # several 8-row filter blocks (one partial), several 32-pixel panels, a long reduction
    (1, 37, 24, 19, 17, 3, 2, 11, 1, 1, 1),
    (3, 20, 40, 13, 11, 3, 4, 9, 2, 1, 1),
    (2, 17, 18, 9, 10, 1, 3, 5, 2, 0, 1),
    # B x keep >= 4 C: the C++ forward's panel-major filter path (a partial filter block; 4 x 4 maps:
    # one panel of 16 pixels, the half-width micro-kernel in float32; strided; several panels)
    (9, 6, 10, 5, 7, 3, 2, 3, 1, 1, 1),
    (12, 5, 24, 4, 4, 3, 2, 5, 1, 1, 1),
    (8, 6, 8, 9, 9, 3, 2, 3, 2, 1, 1),
    (4, 4, 6, 13, 12, 3, 2, 4, 1, 1, 1),
    # B x keep >= 4 C and at most one vector of output pixels: the C++ small-map forward (output
    # channels in the vector lanes; float64 P <= 8 / 4 / 2 on avx512 / avx2 / baseline), partial
    # channel blocks, strided and dilated
    (10, 6, 12, 2, 3, 3, 2, 3, 1, 1, 1),
    (16, 5, 6, 1, 2, 3, 3, 5, 1, 1, 1),
    (9, 4, 8, 5, 3, 3, 2, 2, 2, 1, 1),
    (8, 4, 4, 4, 4, 3, 1, 2, 2, 2, 2),
    # ... larger batches and more channels (samples with few kept channels, 2 and 4 heads)
    (17, 40, 12, 2, 2, 3, 2, 13, 1, 1, 1),
    (20, 64, 8, 1, 2, 3, 4, 20, 1, 1, 1),
    # rows of 4 output pixels at unit horizontal stride (the row-pointer small-map kernel; float64
    # on avx512, float32 on avx2), one with vertical stride 2
    (9, 4, 8, 2, 4, 3, 2, 2, 1, 1, 1),
    (9, 5, 6, 3, 4, 3, 3, 3, (2, 1), 1, 1),
]


def make(B, C, Co, H, W, k, heads, g, dtype=torch.float64, ties=True):
    """Random x, weight and non-negative saliency; with ties, some (b, h) rows get repeated values
    (several equal to the threshold) and exact zeros, as a ReLU output has."""
    kh, kw = (k, k) if isinstance(k, int) else k
    x = testing.randn(B, C, H, W, g=g, dtype=dtype)
    w = testing.randn(Co, C, kh, kw, g=g, dtype=dtype)
    s = testing.rand(B, heads, C, g=g, dtype=torch.float64)
    if ties and C > 2:
        s[0, 0, : C // 2] = s[0, 0, 0]  # a block of equal values
        s[-1, -1, torch.randperm(C, generator=g)[: C // 3]] = 0.0
        s = (s * 4).round() / 4  # coarse grid: ties everywhere
    return x, w, s.to(dtype)


def run(fn, x, w, s, cot, **kw):
    x, w, s = (t.detach().clone().requires_grad_() for t in (x, w, s))
    out = fn(x, w, s, **kw)
    grads = torch.autograd.grad(out, (x, w, s), cot)
    return out.detach(), grads


BACKENDS = ["torch"] + testing.backends()  # torch gather path, C++ (native), Triton where it can run


def op(x, w, s, keep, stride, padding, dilation, backend="auto"):
    return pyeccv.dyn_group_conv2d(x, w, s, keep=keep, stride=stride, padding=padding, dilation=dilation,
                                   backend=backend)


def on(backend, *ts):
    dev = testing.device_of(backend) if backend != "torch" else "cpu"
    return [t.to(dev) for t in ts]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_official_float64(case, ties, backend, g):
    B, C, Co, H, W, k, heads, keep, st, pad, dil = case
    x, w, s = make(B, C, Co, H, W, k, heads, g, ties=ties)
    want = ref.masked_dyn_group_conv2d(x, w, s, keep, st, pad, dil)
    cot = testing.randn(*want.shape, g=g)
    out, grads = run(op, *on(backend, x, w, s, cot), keep=keep, stride=st, padding=pad, dilation=dil, backend=backend)
    want, wgrads = run(ref.masked_dyn_group_conv2d, x, w, s, cot, keep=keep, stride=st, padding=pad, dilation=dil)
    testing.assert_close(out.cpu(), want, "reduction", torch.float64)
    for name, a, b in zip(("d_x", "d_weight", "d_saliency"), grads, wgrads):
        testing.assert_close(a.cpu(), b, "reduction", torch.float64, name=name)


@pytest.mark.parametrize("keep", [1, 2, 5, 11, 12])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_keep(keep, backend, g):
    x, w, s = make(2, 12, 8, 5, 6, 3, 4, g)
    want = ref.masked_dyn_group_conv2d(x, w, s, keep, 1, 1, 1)
    testing.assert_close(op(*on(backend, x, w, s), keep, 1, 1, 1, backend).cpu(), want, "reduction", torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonsquare_kernel_and_noncontiguous(backend, g):
    x, w, s = make(2, 6, 6, 9, 8, (3, 1), 3, g)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    want = ref.masked_dyn_group_conv2d(x, w, s, 4, (2, 1), (1, 0), 1)
    xt, w, s = on(backend, xt, w, s)
    xt = xt.transpose(2, 3).contiguous().transpose(2, 3)
    testing.assert_close(op(xt, w, s[:, :, :], 4, (2, 1), (1, 0), 1, backend).cpu(), want, "reduction", torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_tie_rule(backend, g):
    """All saliencies equal with keep < C: the threshold equals every value, so the official rule
    drops everything (output zero); with keep = C nothing is thresholded."""
    x, w, _ = make(2, 6, 4, 5, 5, 3, 2, g)
    s = torch.full((2, 2, 6), 0.5, dtype=torch.float64)
    assert op(*on(backend, x, w, s), 5, 1, 1, 1, backend).abs().max() == 0
    assert ref.masked_dyn_group_conv2d(x, w, s, 5, 1, 1, 1).abs().max() == 0
    full = op(*on(backend, x, w, s), 6, 1, 1, 1, backend).cpu()
    testing.assert_close(full, ref.masked_dyn_group_conv2d(x, w, s, 6, 1, 1, 1), "reduction", torch.float64)
    assert full.abs().max() > 0
    # 3 distinct top values then a tie block at the threshold: only the 3 survive with keep = 4
    s2 = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.2, 0.1], dtype=torch.float64).expand(2, 2, 6).contiguous()
    only3 = s2 * (s2 > 0.2)
    testing.assert_close(op(*on(backend, x, w, s2), 4, 1, 1, 1, backend), op(*on(backend, x, w, only3), 6, 1, 1, 1, backend),
                         "reduction", torch.float64)


def test_output_order_interleaves_heads(g):
    """Output channel j * heads + h is head h's filter j (official view/transpose)."""
    x, w, s = make(1, 4, 6, 5, 5, 1, 3, g, ties=False)
    out = op(x, w, s, 4, 1, 0, 1)
    for h in range(3):
        xh = x * s[:, h].view(1, 4, 1, 1)
        head = torch.nn.functional.conv2d(xh, w[2 * h: 2 * h + 2])
        testing.assert_close(out[:, h::3], head, "reduction", torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_channels_get_no_gradient(backend, g):
    x, w, s = make(1, 8, 4, 4, 4, 3, 1, g, ties=False)
    keep = 3
    kept = s[0, 0] > s[0, 0].sort(descending=True).values[keep]
    out, (dx, dw, ds) = run(op, *on(backend, x, w, s, torch.ones(1, 4, 2, 2, dtype=x.dtype)), keep=keep, stride=1, padding=0, dilation=1,
                          backend=backend)
    dx, dw, ds = dx.cpu(), dw.cpu(), ds.cpu()
    assert dx[0, ~kept].abs().max() == 0 and dx[0, kept].abs().max() > 0
    assert dw[:, ~kept].abs().max() == 0
    assert ds[0, 0, ~kept].abs().max() == 0 and ds[0, 0, kept].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_keep_zero_saliency_gets_gradient(backend, g):
    """keep = C_in: the official layer does not threshold, so zero-saliency channels still receive
    a saliency gradient (the official ReLU decides, not the op)."""
    x, w, s = make(1, 4, 2, 4, 4, 1, 1, g, ties=False)
    s[0, 0, 1] = 0.0
    _, (_, _, ds) = run(op, *on(backend, x, w, s, torch.ones(1, 2, 4, 4, dtype=x.dtype)), keep=4, stride=1, padding=0, dilation=1,
                       backend=backend)
    _, (_, _, ds_ref) = run(ref.masked_dyn_group_conv2d, x, w, s, torch.ones(1, 2, 4, 4), keep=4, stride=1,
                            padding=0, dilation=1)
    ds = ds.cpu()
    assert ds[0, 0, 1] != 0
    testing.assert_close(ds, ds_ref, "reduction", torch.float64)


class _ConvChannels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[0].shape[1], args[8]))  # input channels, groups
        return func(*args, **(kwargs or {}))


def test_only_kept_channels_reach_the_conv(g):
    B, C, heads, keep = 3, 16, 4, 5
    x, w, s = make(B, C, 8, 6, 6, 3, heads, g, dtype=torch.float32, ties=False)
    with _ConvChannels() as mode:  # the op's body (the mode sees a custom op as one call)
        out = ops._forward_torch(x, w, s, keep, [1, 1], [1, 1], [1, 1])
    testing.assert_close(out, op(x, w, s, keep, 1, 1, 1), "reduction", torch.float32)
    assert mode.seen == [(B * heads * keep, B * heads)]


# float32 on the small-map forward (its float32 tiles differ from float64's: 16 pixels on avx512,
# 8 on avx2): 4 x 4 maps, rows of 4 pixels, strided rows, and maps that are not 4 wide
@pytest.mark.parametrize("case", [(12, 5, 24, 4, 4, 3, 2, 5, 1, 1, 1), (9, 4, 8, 2, 4, 3, 2, 2, 1, 1, 1),
                                  (9, 5, 6, 3, 4, 3, 3, 3, (2, 1), 1, 1), (16, 5, 6, 1, 2, 3, 3, 5, 1, 1, 1),
                                  (17, 40, 12, 3, 3, 3, 2, 13, 1, 1, 1)], ids=lambda c: "x".join(map(str, c)))
def test_small_maps_float32(case, g):
    B, C, Co, H, W, k, heads, keep, st, pad, dil = case
    x, w, s = make(B, C, Co, H, W, k, heads, g, dtype=torch.float32)
    want = ref.masked_dyn_group_conv2d(x.double(), w.double(), s.double(), keep, st, pad, dil)
    with testing.poisoned():
        out = op(x, w, s, keep=keep, stride=st, padding=pad, dilation=dil)
    testing.assert_close(out, want, "reduction", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(dtype, backend, g):
    x, w, s = make(3, 12, 8, 9, 7, 3, 4, g, dtype=dtype)
    want = ref.masked_dyn_group_conv2d(x.double(), w.double(), s.double(), 7, 1, 1, 1)
    cot = testing.randn(*want.shape, g=g)
    out, grads = run(op, *on(backend, x, w, s, cot.to(dtype)), keep=7, stride=1, padding=1, dilation=1, backend=backend)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    out, grads = out.cpu(), [t.cpu() for t in grads]
    _, wgrads = run(ref.masked_dyn_group_conv2d, x.double(), w.double(), s.double(), cot, keep=7, stride=1,
                    padding=1, dilation=1)
    testing.assert_close(out, want, "reduction", dtype)
    for name, a, b in zip(("d_x", "d_weight", "d_saliency"), grads, wgrads):
        testing.assert_close(a, b, "reduction", dtype, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, g):
    x, w, s = make(1, 4, 4, 5, 5, 3, 2, g)
    out = op(*on(backend, x[:0], w, s[:0]), 2, 1, 1, 1, backend)
    assert out.shape == (0, 4, 5, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, g):
    # distinct saliencies spaced well beyond gradcheck's eps, so the selection does not flip
    x, w, _ = make(2, 5, 4, 3, 3, 3, 2, g, ties=False)
    s = (torch.stack([torch.randperm(5, generator=g) for _ in range(4)]).view(2, 2, 5).double() + 1) / 5
    args = [t.clone().requires_grad_() for t in on(backend, x, w, s)]
    full = backend != "triton" or testing.triton_device() == "cuda"  # the interpreter is slow: fast mode
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, 3, 2, 1, 1, backend), args, fast_mode=not full)
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, 5, 1, 2, 2, backend), args, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, g):
    x, w, s = make(2, 6, 4, 5, 4, 3, 2, g, ties=False)
    s = s + 0.01
    gout = testing.randn(2, 4, 3, 4, g=g)  # stride (2, 1) on 5x4 with padding 1
    x, w, s, gout = on(backend, x, w, s, gout)
    args = [t.requires_grad_() for t in (x, w, s)]
    testing.opcheck(torch.ops.pyeccv.dyn_group_conv_fwd.default, (*args, 3, [1, 1], [1, 1], [1, 1], backend))
    testing.opcheck(torch.ops.pyeccv.dyn_group_conv_bwd.default,
                    (gout, x.detach(), w.detach(), s.detach(), 3, [2, 1], [1, 1], [1, 1], backend), skip_autograd=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile(backend, g):
    x, w, s = make(2, 8, 8, 6, 6, 3, 4, g, dtype=torch.float32, ties=False)

    def fn(x, w, s):  # the op alone: nothing for inductor to compile with gcc (keeps the test fast)
        return pyeccv.dyn_group_conv2d(x, w, s, keep=3, stride=2, padding=1, backend=backend)

    testing.compile_check(fn, *on(backend, x, w, s))


def test_bad_inputs(g):
    x, w, s = make(2, 6, 4, 5, 5, 3, 2, g)
    bad = [
        dict(keep=0), dict(keep=7), dict(keep=2.0), dict(keep=True),
        dict(s=s[:, :, :5]), dict(s=s[:1]), dict(s=s[:, :1].expand(2, 3, 6)),  # 4 % 3 != 0
        dict(s=-s), dict(s=s.float()), dict(w=w[:, :5]), dict(w=w.float()), dict(x=x[0]),
        dict(x=x.int(), w=w.int(), s=s.int()), dict(stride=0), dict(padding=-1), dict(dilation=(1, 2, 3)),
        dict(x=x[:, :, :1, :1]), dict(backend="reference"), dict(backend="cuda"),
    ]
    for kw in bad:
        args = dict(x=x, w=w, s=s, keep=2, stride=1, padding=0, dilation=1, backend="auto")
        args.update(kw)
        with pytest.raises(ValueError):
            pyeccv.dyn_group_conv2d(args["x"], args["w"], args["s"], keep=args["keep"], stride=args["stride"],
                                    padding=args["padding"], dilation=args["dilation"], backend=args["backend"])
    nan = s.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        pyeccv.dyn_group_conv2d(x, w, nan, keep=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_native_writes_every_element_and_is_deterministic(stride, g):
    """The C++ kernels write every output element (buffers poisoned with NaN first), agree across
    thread counts, and repeat bit for bit at a fixed thread count."""
    from pyeccv import _backend

    C_ = _backend.C()
    x, w, s = make(2, 19, 12, 11, 9, 3, 3, g, dtype=torch.float32)
    keep, st, pad = 7, [stride, stride], [1, 1]
    args = ops._native_args(x, w, s, keep, st, pad, [1, 1])
    ho, wo = ops._out_size(11, 3, stride, 1, 1), ops._out_size(9, 3, stride, 1, 1)
    gout = testing.randn(2, 12, ho, wo, g=g, dtype=torch.float32)
    results = []
    for threads in (1, 2, 2):
        out = torch.full((2, 12, ho, wo), float("nan"))
        grads = [torch.full_like(t, float("nan")) for t in (x, w, s)]
        C_.dgc_forward_cpu(*args, out.data_ptr(), threads)
        C_.dgc_backward_cpu(*args, gout.data_ptr(), *(t.data_ptr() for t in grads), threads)
        for t in (out, *grads):
            assert not t.isnan().any()
        results.append((out, *grads))
    want = ref.masked_dyn_group_conv2d(x.double(), w.double(), s.double(), keep, st, pad, [1, 1])
    testing.assert_close(results[0][0], want, "reduction", torch.float32)
    for a, b in zip(results[0], results[1]):
        testing.assert_close(a, b, "reduction", torch.float32)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:2] + CASES[9:12], ids=lambda c: "x".join(map(str, c)))
def test_cuda_auto_matches_official(case, dtype, g):
    """On a GPU, backend "auto" (Triton) against the official computation, forward and gradients."""
    B, C, Co, H, W, k, heads, keep, st, pad, dil = case
    x, w, s = make(B, C, Co, H, W, k, heads, g)
    x, w, s = (t.to(dtype).double() for t in (x, w, s))  # values representable in dtype
    want = ref.masked_dyn_group_conv2d(x, w, s, keep, st, pad, dil)
    cot = testing.randn(*want.shape, g=g)
    want, wgrads = run(ref.masked_dyn_group_conv2d, x, w, s, cot, keep=keep, stride=st, padding=pad, dilation=dil)
    out, grads = run(op, *(t.to(dtype).cuda() for t in (x, w, s, cot)), keep=keep, stride=st, padding=pad,
                     dilation=dil)
    testing.assert_close(out.cpu().double(), want, "reduction", dtype)  # fp32: 3xTF32 dots by default
    for name, a, b in zip(("d_x", "d_weight", "d_saliency"), grads, wgrads):
        testing.assert_close(a.cpu().double(), b, "reduction", dtype, name=name)


@pytest.mark.cuda
def test_cuda_layer_matches_cpu(g):
    """The layer on CUDA (saliency MLPs + Triton conv) against the same layer on CPU (C++)."""
    layer = pyeccv.nn.DynamicGroupConv2d(32, 16, 3, padding=1, heads=4, gate_factor=0.25).double()
    layer.inactive_channels = 24
    layer.eval()
    x = testing.randn(3, 32, 9, 7, g=g)
    with torch.no_grad():
        want = layer(x)
        got = layer.cuda()(x.cuda()).cpu()
    testing.assert_close(got, want, "reduction", torch.float64)
