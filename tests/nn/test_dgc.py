"""DGC layer and DGC-ResNet-18 against modules built like the official ones
(pyeccv.reference.dyn_group_conv: DynamicMultiHeadConv / HeadConv / dyresnet18): same state_dict
keys and shapes, official state dicts load, same outputs, lasso terms, gradients and buffers in
training (across the pruning schedule) and eval; the progressive schedule; the lasso term;
dgc_resnet18 forward/backward with the ImageNet and CIFAR stems at tiny sizes."""
import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.models import dgc_resnet18
from pyeccv.nn import DynamicGroupConv2d
from pyeccv.reference import dyn_group_conv as ref


@pytest.fixture(autouse=True)
def _official_global_progress():
    """The official layer reads a class-level global; leave it as found."""
    saved = ref.DynamicMultiHeadConv.global_progress
    yield
    ref.DynamicMultiHeadConv.global_progress = saved


def randomise_bn(module, g):
    """Non-trivial BN affine parameters and running statistics (a trained checkpoint's look)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = testing.rand(n, g=g, low=0.5, high=1.5, dtype=m.weight.dtype)
            m.bias.data = testing.randn(n, g=g, dtype=m.bias.dtype) * 0.1
            m.running_mean = testing.randn(n, g=g, dtype=m.running_mean.dtype) * 0.1
            m.running_var = testing.rand(n, g=g, low=0.5, high=1.5, dtype=m.running_var.dtype)


def pair(C, Co, k, g, stride=1, padding=0, dilation=1, heads=4, squeeze_rate=16, gate_factor=0.25):
    kw = dict(stride=stride, padding=padding, dilation=dilation, heads=heads, squeeze_rate=squeeze_rate,
              gate_factor=gate_factor)
    official = ref.DynamicMultiHeadConv(C, Co, k, **kw).double()
    randomise_bn(official, g)
    ours = DynamicGroupConv2d(C, Co, k, **kw).double()
    ours.load_state_dict(official.state_dict())
    return official, ours


def test_state_dict_keys_match_official():
    official = ref.DynamicMultiHeadConv(32, 16, 3, padding=1, heads=4)
    ours = DynamicGroupConv2d(32, 16, 3, padding=1, heads=4)
    a, b = official.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert "headconv_3.fc2.bias" in b and "_inactive_channels" in b and "norm.running_var" in b
    assert b["headconv_0.fc1.weight"].shape == (32 // 8, 32)  # C < 80: squeeze rate halved
    assert bool((b["headconv_2.fc2.bias"] == 1).all())


@pytest.mark.parametrize("cfg", [
    dict(C=16, Co=8, k=3, stride=1, padding=1, heads=4),
    dict(C=12, Co=12, k=1, stride=2, padding=0, heads=2),
    dict(C=96, Co=8, k=3, stride=2, padding=2, dilation=2, heads=4, gate_factor=0.5),  # C >= 80: full squeeze
    dict(C=8, Co=4, k=3, stride=1, padding=1, heads=1, squeeze_rate=4),
])
def test_layer_matches_official(cfg, g):
    cfg = dict(cfg)
    C, Co, k = cfg.pop("C"), cfg.pop("Co"), cfg.pop("k")
    official, ours = pair(C, Co, k, g, **cfg)
    x = testing.randn(3, C, 7, 6, g=g, dtype=torch.float64)
    for progress in (0.0, 0.3, 0.5, 0.74, 0.9):  # through the schedule, training mode
        ref.DynamicMultiHeadConv.global_progress = progress
        ours.set_progress(progress)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, wl = official(xr)
        got, gl = ours(xo, return_lasso=True)
        assert ours.inactive_channels == official.inactive_channels
        testing.assert_close(got, want, "reduction", torch.float64)
        testing.assert_close(gl, torch.as_tensor(wl), "reduction", torch.float64, name="lasso")
        cot = testing.randn(*want.shape, g=g, dtype=torch.float64)
        pr, po = dict(official.named_parameters()), dict(ours.named_parameters())
        names = list(pr)
        gr = torch.autograd.grad((want * cot).sum() + 0.1 * wl, [xr] + [pr[n] for n in names])
        go = torch.autograd.grad((got * cot).sum() + 0.1 * gl, [xo] + [po[n] for n in names])
        for n, a, b in zip(["x"] + names, go, gr):
            testing.assert_close(a, b, "reduction", torch.float64, name=f"d_{n}")
    for (n, a), (_, b) in zip(ours.named_buffers(), official.named_buffers()):
        testing.assert_close(a.double(), b.double(), "reduction", torch.float64, name=n)
    official.eval()
    ours.eval()
    with torch.no_grad():
        testing.assert_close(ours(x), official(x)[0], "reduction", torch.float64)


def test_schedule():
    m = DynamicGroupConv2d(16, 8, 3, padding=1, heads=4, gate_factor=0.25)
    x = torch.randn(2, 16, 5, 5)

    def step(p, train=True):
        m.train(train)
        m.set_progress(p)
        with torch.no_grad():
            m(x)
        return m.inactive_channels

    # official: 0 up to 1/12, round(C (1 - g) 1.5 (p - 1/12)) up to 3/4, then round(C (1 - g))
    assert step(0.0) == 0 and step(1 / 12) == 0
    assert step(0.2) == round(16 * 0.75 * 1.5 * (0.2 - 1 / 12)) == 2
    assert step(0.5) == 8  # round(7.5): Python's round, as the official code
    assert step(0.75) == 12 and step(1.0) == 12 and m.keep == 4
    assert step(0.3, train=False) == 12  # eval mode leaves the buffer alone
    assert step(0.05) == 12  # the official code keeps the count before 1/12
    m.inactive_channels = 5
    assert m.state_dict()["_inactive_channels"].item() == 5 and m.keep == 11


def test_all_channels_pruned_gives_zeros():
    m = DynamicGroupConv2d(4, 4, 3, padding=1, heads=2, squeeze_rate=4, gate_factor=0.0).eval()
    m.inactive_channels = 4
    out, lasso = m(torch.randn(2, 4, 5, 5), return_lasso=True)
    assert out.shape == (2, 4, 5, 5) and out.abs().max() == 0 and lasso > 0


def test_lasso(g):
    official, ours = pair(16, 8, 3, g, padding=1)
    x = testing.randn(2, 16, 6, 6, g=g, dtype=torch.float64)
    ours.set_progress(0.9)
    _, lasso = ours(x, return_lasso=True)
    with torch.no_grad():
        sal = ours.saliency(torch.relu(ours.norm(x)))
    want = sum(sal[:, h].mean() for h in range(4))  # official: sum over heads of mask.mean()
    testing.assert_close(lasso, want, "reduction", torch.float64)
    lasso.backward()
    assert all(getattr(ours, f"headconv_{h}").fc2.bias.grad.abs().sum() > 0 for h in range(4))


def test_bad_config():
    with pytest.raises(ValueError):
        DynamicGroupConv2d(10, 8, 3, heads=4)
    with pytest.raises(ValueError):
        DynamicGroupConv2d(8, 6, 3, heads=4)
    with pytest.raises(ValueError):
        DynamicGroupConv2d(8, 8, 3, heads=4, gate_factor=1.5)


# ---- DGC-ResNet-18 ------------------------------------------------------------------------------
def test_resnet_keys_match_official():
    a = ref.dyresnet18(num_classes=10).state_dict()
    for stem in ("imagenet", "cifar"):
        b = dgc_resnet18(10, stem=stem).state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a if k != "conv1.weight")
    assert "layer2.0.downsample.0.headconv_1.conv.weight" in a and "layer2.0.downsample.1.norm.weight" in a


def test_resnet_matches_official_imagenet_stem(g):
    torch.manual_seed(g.initial_seed())
    official = ref.dyresnet18(num_classes=7, heads=2).double()
    randomise_bn(official, g)
    ours = dgc_resnet18(7, heads=2).double()
    ours.load_state_dict(official.state_dict())
    for m in list(official.modules()) + list(ours.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):  # eval below then sees this batch's statistics, not a blow-up
            m.momentum = 1.0
    # 8 x 32 x 32: the last layer still normalises 32 values a channel (with 2 x 16 x 16, 1 x 1 maps
    # gave near-zero running variances, and eval overflowed to inf in both models on some draws)
    x = testing.randn(8, 3, 32, 32, g=g, dtype=torch.float64)
    for progress in (0.6,):
        want, wl = official(x, progress)
        got, gl = ours(x, progress)
        testing.assert_close(got, want, "reduction", torch.float64, name="logits")
        assert len(gl) == len(wl) == 19
        testing.assert_close(torch.stack(gl), torch.stack(wl), "reduction", torch.float64, name="lasso")
    official.eval()
    ours.eval()
    with torch.no_grad():
        testing.assert_close(ours(x)[0], official(x)[0], "reduction", torch.float64, name="eval logits")


def test_resnet_cifar_forward_backward(g):
    model = dgc_resnet18(10, stem="cifar", heads=4)
    x = testing.randn(2, 3, 8, 8, g=g)
    y = torch.tensor([1, 7])
    logits, lasso = model(x, progress=0.9)  # pruning on: 3 of 4 input channels dropped per head
    assert logits.shape == (2, 10) and len(lasso) == 19
    assert all(m.keep == m.in_channels // 4 for m in model.modules() if isinstance(m, DynamicGroupConv2d))
    loss = torch.nn.functional.cross_entropy(logits, y) + 1e-5 * sum(lasso)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    assert model.layer3[1].conv2.headconv_0.conv.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.headconv_2.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        dgc_resnet18(10, stem="tiny")
    assert pyeccv.models.DGCResNet is type(model)


def test_resnet_width_and_backend(g):
    """width scales every stage (same keys as the official model); the backend reaches every layer."""
    model = dgc_resnet18(5, stem="cifar", width=8, heads=4).double()
    sd = model.state_dict()
    assert list(sd) == list(dgc_resnet18(5, stem="cifar").state_dict())
    assert sd["conv1.weight"].shape == (8, 3, 3, 3) and sd["fc.weight"].shape == (5, 64)
    assert sd["layer3.0.conv1.headconv_0.conv.weight"].shape == (8, 16, 3, 3)  # 32 outputs over 4 heads
    for bad in (6, 0, 2.0):
        with pytest.raises(ValueError, match="width"):
            dgc_resnet18(5, width=bad, heads=4)
    model.set_progress(0.9)
    x = testing.randn(3, 3, 12, 12, g=g, dtype=torch.float64)
    with torch.no_grad():  # training mode (batch statistics: an untrained net's eval mode can overflow)
        want = model(x, backend="torch")[0]
        assert all(m.keep == m.in_channels // 4 for m in model.modules() if isinstance(m, DynamicGroupConv2d))
        testing.assert_close(model(x, backend="native")[0], want, "reduction", torch.float64)
        with pytest.raises(ValueError, match="backend"):
            model(x, backend="cudnn")


def test_resnet_recalibrate_bn(g):
    """recalibrate_bn: running statistics = the exact average of the batch statistics at the current
    weights (stem BN checked by hand), nothing else changes (parameters, pruning level, momentum,
    training flag)."""
    model = dgc_resnet18(4, stem="cifar", width=8, heads=4).double()
    model.set_progress(0.5)
    with torch.no_grad():
        model(testing.randn(2, 3, 8, 8, g=g, dtype=torch.float64))  # running stats move, pruning level set
    keep = [m.inactive_channels for m in model.modules() if isinstance(m, DynamicGroupConv2d)]
    model.set_progress(1.0)  # a training-mode forward would prune further; recalibration must not
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [testing.randn(5, 3, 8, 8, g=g, dtype=torch.float64) for _ in range(3)]
    model.eval()
    assert model.recalibrate_bn(iter(batches)) == 15
    assert not model.training
    assert [m.inactive_channels for m in model.modules() if isinstance(m, DynamicGroupConv2d)] == keep
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        stem = [model.conv1(b) for b in batches]
    mean = torch.stack([s.mean((0, 2, 3)) for s in stem]).mean(0)
    var = torch.stack([s.var((0, 2, 3), unbiased=True) for s in stem]).mean(0)
    testing.assert_close(model.bn1.running_mean, mean, "reduction", torch.float64)
    testing.assert_close(model.bn1.running_var, var, "reduction", torch.float64)
    assert int(model.bn1.num_batches_tracked) == 3
    # the last block's BN saw pruned DGC outputs: recalibrating twice gives the same statistics
    first = model.layer4[1].bn2.running_var.clone()
    model.train()
    model.recalibrate_bn(batches)
    assert model.training
    testing.assert_close(model.layer4[1].bn2.running_var, first, "reduction", torch.float64)
    with pytest.raises(ValueError, match="empty"):
        model.recalibrate_bn([])
