"""Gradient Centralization optimizers: parity with torch.optim (gc_mode=None, bit for bit) and with
the official GC optimizers (over several steps), every backend, dtypes, state_dict, GradScaler,
DDP and FSDP2 / DTensor, bad arguments, the custom ops' contract."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import pyeccv.optim as O
from pyeccv import testing
from pyeccv.ops.grad_central import gc_adam_, gc_sgd_
from pyeccv.reference import grad_central as ref


class Net(nn.Module):
    """conv (4-D), linear (2-D), norm and bias (1-D) parameters, a (C, 1) weight (1-element rows),
    an empty parameter and one that never gets a gradient."""

    def __init__(self, norm="batch"):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.norm = nn.BatchNorm2d(5) if norm == "batch" else nn.GroupNorm(1, 5)  # per-sample for DDP
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.col = nn.Parameter(torch.randn(7, 1) * 0.1)
        self.empty = nn.Parameter(torch.zeros(0, 4))
        self.unused = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.fc(h) * self.col.t() + self.empty.sum()


def make(dtype=torch.float64, seed=0, norm="batch"):
    torch.manual_seed(seed)
    return Net(norm).to(dtype)


def batches(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g).to(dtype), torch.randint(0, 7, (4,), generator=g))
            for _ in range(n)]


def train(model, opt, data, closure_style=False):
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out.float() if out.dtype in (torch.bfloat16, torch.float16) else out, y)
        loss.backward()
        opt.step()
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def run(opt_fn, dtype=torch.float64, steps=5, device="cpu"):
    model = make(dtype).to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches(steps, dtype)]
    return train(model, opt_fn(model.parameters()), data)


def backends():
    out = ["native", "reference"]
    if testing.triton_device() == "cpu":
        out.append("triton")
    return out


# ---- gc_mode=None is torch.optim, bit for bit ----------------------------------------------------
TORCH_CASES = [
    (torch.optim.SGD, O.SGD, dict(lr=0.1)),
    (torch.optim.SGD, O.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, maximize=True)),
    (torch.optim.SGD, O.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, O.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    (torch.optim.Adam, O.Adam, dict(lr=1e-2, amsgrad=True, maximize=True, betas=(0.8, 0.99))),
    (torch.optim.AdamW, O.AdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, O.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, eps=1e-6)),
]


@pytest.mark.parametrize("torch_cls,cls,kw", TORCH_CASES)
def test_gc_none_is_torch_bit_for_bit(torch_cls, cls, kw):
    for dtype in (torch.float64, torch.float32):
        want = run(lambda ps: torch_cls(ps, **kw), dtype)
        got = run(lambda ps: cls(ps, gc_mode=None, **kw), dtype)
        assert torch.equal(got, want)


# ---- with GC: the official optimizers ---------------------------------------------------------
OFFICIAL_CASES = [
    # (official factory, ours factory) sharing hyper-parameters
    (lambda ps: ref.SGD_GC(ps, lr=0.1), lambda ps, b: O.SGD_GC(ps, lr=0.1, backend=b)),
    (lambda ps: ref.SGD_GC(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
     lambda ps, b: O.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, backend=b)),
    (lambda ps: ref.SGD_GCC(ps, lr=0.1, momentum=0.8, dampening=0.2),
     lambda ps, b: O.SGD_GCC(ps, lr=0.1, momentum=0.8, dampening=0.2, backend=b)),
    (lambda ps: ref.Adam_GC(ps, lr=1e-2, weight_decay=1e-3),
     lambda ps, b: O.Adam_GC(ps, lr=1e-2, weight_decay=1e-3, backend=b)),
    (lambda ps: ref.Adam_GCC(ps, lr=1e-2, amsgrad=True, betas=(0.8, 0.99)),
     lambda ps, b: O.Adam(ps, lr=1e-2, amsgrad=True, betas=(0.8, 0.99), gc_mode="conv", backend=b)),
    (lambda ps: ref.AdamGCLoc(ps, lr=1e-2, weight_decay=1e-3, gc_loc=False),
     lambda ps, b: O.Adam(ps, lr=1e-2, weight_decay=1e-3, gc_loc="update", backend=b)),
    (lambda ps: ref.AdamGCLoc(ps, lr=1e-2, gc_loc=False, gc_conv_only=True, amsgrad=True),
     lambda ps, b: O.Adam(ps, lr=1e-2, gc_loc="update", gc_mode="conv", amsgrad=True, backend=b)),
    # AdamW: the official forms scale the decay differently; they agree with torch's at wd = 0
    (lambda ps: ref.AdamGCLoc(ps, lr=1e-2, weight_decay=0.0, adamw=True),
     lambda ps, b: O.AdamW_GC(ps, lr=1e-2, weight_decay=0.0, backend=b)),
    (lambda ps: ref.AdamGCLoc(ps, lr=1e-2, weight_decay=0.0, adamw=True, gc_loc=False),
     lambda ps, b: O.AdamW(ps, lr=1e-2, weight_decay=0.0, gc_loc="update", backend=b)),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", range(len(OFFICIAL_CASES)))
def test_gc_equals_official(case, backend):
    official, ours = OFFICIAL_CASES[case]
    want = run(official, torch.float64)
    with testing.poisoned():
        got = run(lambda ps: ours(ps, backend), torch.float64)
    # float64; the update-location variants divide by sqrt(v) + eps early on, which amplifies
    # rounding differences between equivalent formulas (lerp vs mul-add) to ~1e-10
    testing.assert_close(got, want, "reduction", torch.float64, name="params") if case < 5 else \
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_adamw_decay_is_torchs(g):
    """AdamW: decoupled decay p -= lr * wd * p (torch), checked against the torch-ops backend and
    against torch.optim.AdamW on a model whose only GC'd parameters get zero gradient means."""
    for backend in ("native", "reference"):
        want = run(lambda ps: O.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference"))
        got = run(lambda ps: O.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend))
        testing.assert_close(got, want, "reduction", torch.float64)
    # 1-D parameters are never centralised: on them GC-AdamW is torch's AdamW
    w1, w2 = (nn.Parameter(torch.randn(11, dtype=torch.float64)) for _ in range(2))
    w2.data.copy_(w1.data)
    o1, o2 = torch.optim.AdamW([w1], lr=0.1, weight_decay=0.3), O.AdamW([w2], lr=0.1, weight_decay=0.3)
    for _ in range(4):
        for w, o in ((w1, o1), (w2, o2)):
            o.zero_grad()
            (w ** 3).sum().backward()
            o.step()
    torch.testing.assert_close(w1, w2, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", backends())
def test_float32_to_rounding(backend):
    for official, ours in (OFFICIAL_CASES[1], OFFICIAL_CASES[3], OFFICIAL_CASES[5]):
        want = run(official, torch.float64)
        got = run(lambda ps: ours(ps, backend), torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(dtype):
    for factory in (lambda ps, b: O.Adam(ps, lr=1e-2, backend=b), lambda ps, b: O.SGD(ps, lr=0.1, momentum=0.9,
                                                                                       backend=b)):
        model = make(dtype)
        opt = factory(model.parameters(), "native")
        want_model = make(dtype)
        want = train(want_model, factory(want_model.parameters(), "reference"), batches(3, dtype))
        got = train(model, opt, batches(3, dtype))
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim():
                    assert v.dtype == torch.float32, k
        # same float32 math, then one rounding to the low-precision parameter
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        assert (got != 0).any()


def test_state_dict_round_trip_mid_training():
    data = batches(6, torch.float64)
    for factory in (lambda ps: O.Adam(ps, lr=1e-2, amsgrad=True, gc_loc="update"),
                    lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)):
        model = make()
        opt = factory(model.parameters())
        want = train(model, opt, data)
        model = make()
        opt = factory(model.parameters())
        train(model, opt, data[:3])
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        assert saved_opt["param_groups"][0]["gc_mode"] == "all"
        model2 = make(seed=5)
        model2.load_state_dict(saved_model)
        opt2 = factory(model2.parameters())
        opt2.load_state_dict(saved_opt)
        got = train(model2, opt2, data[3:])
        assert torch.equal(got, want)
    # torch keys: a torch.optim.Adam state_dict loads into pyeccv.optim.Adam and back
    model = make()
    topt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, topt, data[:2])
    popt = O.Adam(model.parameters(), lr=1e-2)
    popt.load_state_dict(topt.state_dict())
    assert set(popt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    train(model, popt, data[2:3])


def test_grad_scaler_skips_inf_steps():
    model = make(torch.float32)
    opt = O.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batches(1, torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a step with inf was taken"
    assert scaler.get_scale() < 1024.0 and not opt.state
    # a clean step: the unscaled gradients reach the optimizer
    ref_model = copy.deepcopy(model)
    ref_opt = O.Adam(ref_model.parameters(), lr=1e-2)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    ref_opt.zero_grad()
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grads_and_layouts():
    """Non-contiguous gradients, channels_last weights, a strided parameter, params without grads."""
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(6, 4, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last))
    base = torch.randn(5, 14, dtype=torch.float64)
    s = nn.Parameter(base[:, ::2])  # strided parameter
    none = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    params = [w, s, none]
    gw = torch.randn(4, 3, 3, 6, dtype=torch.float64).permute(3, 0, 1, 2)  # non-contiguous grad
    gs = torch.randn(5, 7, dtype=torch.float64)
    for backend in backends():
        cl = [p.detach().clone() for p in params]
        copies = [nn.Parameter(c) for c in cl]
        o_ref = ref.Adam_GC([c for c in copies[:2]], lr=0.1)
        ours = [nn.Parameter(p.detach().clone()) for p in params]
        opt = O.Adam(ours, lr=0.1, backend=backend)
        for step in range(2):
            for q, g in zip(copies[:2], (gw, gs)):
                q.grad = g.clone()
            ours[0].grad, ours[1].grad = gw.clone(), gs.clone()
            o_ref.step()
            opt.step()
        testing.assert_close(ours[0].detach(), copies[0].detach(), "reduction", torch.float64)
        testing.assert_close(ours[1].detach(), copies[1].detach(), "reduction", torch.float64)
        assert torch.equal(ours[2], none) and ours[2] not in opt.state


def test_bad_arguments():
    ps = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        O.Adam(ps, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
        O.Adam(ps, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        O.AdamW(ps, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        O.SGD(ps, lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        O.SGD(ps, lr=0.1, nesterov=True)
    for cls in (O.SGD, O.Adam, O.AdamW):
        with pytest.raises(ValueError, match="gc_mode must be one of"):
            cls(ps, lr=0.1, gc_mode="linear")
    with pytest.raises(ValueError, match="gc_loc must be one of"):
        O.Adam(ps, gc_loc="moments")
    with pytest.raises(ValueError, match="fused=True is not supported"):
        ps[0].grad = torch.ones(3, 3)
        O.Adam(ps, fused=True).step()


def test_param_groups_mix_modes():
    model = make()
    data = batches(3, torch.float64)
    groups = [{"params": [model.conv.weight], "gc_mode": None}, {"params": [p for n, p in model.named_parameters()
                                                                           if n != "conv.weight"]}]
    opt = O.Adam(groups, lr=1e-2)
    train(model, opt, data)
    assert opt.param_groups[0]["gc_mode"] is None and opt.param_groups[1]["gc_mode"] == "all"


# ---- the custom ops ---------------------------------------------------------------------------------
def test_opcheck_ops(g):
    def fresh():
        ps = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
        return ps, [torch.randn_like(p) for p in ps]

    ps, gs = fresh()
    bufs = [torch.zeros_like(p) for p in ps]
    testing.opcheck(torch.ops.pyeccv.gc_sgd_.default, (ps, gs, bufs, [True, False, True], [True, True, True],
                                                        0.1, 0.9, 0.0, 0.01, False, False, "auto"), skip_autograd=True)
    ps, gs = fresh()
    m, v, x = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    testing.opcheck(torch.ops.pyeccv.gc_adam_.default, (ps, gs, m, v, x, [True, False, True], [0.1, 0.1, 0.1],
                                                         [0.5, 0.5, 0.5], 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False,
                                                         False, True, "auto"), skip_autograd=True)


def test_ops_compile_fullgraph(g):
    ps = [torch.randn(4, 3, generator=g), torch.randn(6, generator=g)]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]

    def step(ps, gs, bufs):
        gc_sgd_(ps, gs, bufs, [True, False], [True, True], 0.1, 0.9, 0.0, 0.0, False, False, "auto")
        return ps[0].sum() + ps[1].sum()

    eager = [p.clone() for p in ps]
    step(eager, gs, [b.clone() for b in bufs])
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(ps, gs, bufs)
    for a, b in zip(ps, eager):
        torch.testing.assert_close(a, b)


def test_op_argument_errors():
    p = [torch.randn(3, 2)]
    with pytest.raises(ValueError, match=r"grads must hold one tensor per parameter \(1\)"):
        gc_sgd_(p, [], [], [True], [True], 0.1, 0.0, 0.0, 0.0, False, False, "auto")
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must match params\[0\]"):
        gc_adam_(p, [torch.randn(3, 2)], [torch.zeros(2, 3)], [torch.zeros(3, 2)], [], [True], [0.1], [1.0], 0.1,
                 0.9, 0.99, 1e-8, 0.0, False, False, False, False, "auto")
    with pytest.raises(ValueError, match="params must share one device and dtype"):
        gc_sgd_([torch.randn(2), torch.randn(2, dtype=torch.float64)], [torch.randn(2), torch.randn(2).double()],
                [], [False, False], [True, True], 0.1, 0.0, 0.0, 0.0, False, False, "auto")


# ---- distributed --------------------------------------------------------------------------------
def _ddp_worker(rank, world, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make(torch.float64, norm="group"), find_unused_parameters=True)  # Net.unused never gets a gradient
    opt = O.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for x, y in batches(steps, torch.float64):
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.module.parameters()]).numpy()


def test_ddp_two_ranks_equal_one_process():
    out = testing.run_distributed(_ddp_worker, 2, 3)
    model = make(torch.float64, norm="group")
    opt = O.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    want = train(model, opt, batches(3, torch.float64))
    np.testing.assert_array_equal(out[0], out[1])  # the ranks stay in sync
    # DDP averages the two half-batch gradients: the full-batch gradient up to float64 rounding
    np.testing.assert_allclose(out[0], want.numpy(), rtol=1e-10, atol=1e-12)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def _fsdp_worker(rank, world, steps, gc_loc):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    placements = sorted({str(p.placements) for p in model.parameters()})
    opt = O.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, gc_loc=gc_loc)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g).double(), torch.randn(8, 3, generator=g).double()
        opt.zero_grad()
        nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()
    return placements, [p.full_tensor().detach().numpy() for p in model.parameters()]


@pytest.mark.parametrize("gc_loc", ["grad", "update"])
def test_fsdp2_sharded_equals_unsharded(gc_loc):
    out = testing.run_distributed(_fsdp_worker, 2, 3, gc_loc)
    assert out[0][0] == ["(Shard(dim=0),)"], out[0][0]
    model = _mlp()
    opt = O.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, gc_loc=gc_loc)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=g).double(), torch.randn(8, 3, generator=g).double()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for a, p in zip(out[0][1], model.parameters()):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-10, atol=1e-12)


def _dtensor_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results = []
    for dim in (0, 1):
        torch.manual_seed(0)
        full = torch.randn(6, 4, dtype=torch.float64)
        grad = torch.randn(6, 4, dtype=torch.float64)
        p = nn.Parameter(distribute_tensor(full, mesh, [Shard(dim)]))
        p.grad = distribute_tensor(grad, mesh, [Shard(dim)])
        opt = O.SGD([p], lr=0.5)
        try:
            opt.step()
            results.append(("ok", p.full_tensor().detach().numpy()))
        except ValueError as e:
            results.append(("ValueError", str(e)))
    return results


def test_dtensor_row_sharding_ok_column_sharding_raises():
    out = testing.run_distributed(_dtensor_worker, 2)
    (status0, value0), (status1, value1) = out[0]
    torch.manual_seed(0)
    full, grad = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    want = full - 0.5 * (grad - grad.mean(1, keepdim=True))
    assert status0 == "ok"
    np.testing.assert_allclose(value0, want.numpy(), rtol=1e-14)
    assert status1 == "ValueError" and "sharded on dim 1" in value1


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("case", range(len(OFFICIAL_CASES)))
def test_cuda_equals_official(case):
    official, ours = OFFICIAL_CASES[case]
    want = run(official, torch.float64)
    got = run(lambda ps: ours(ps, "auto"), torch.float64, device="cuda").cpu()
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    got32 = run(lambda ps: ours(ps, "auto"), torch.float32, device="cuda").cpu()
    torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_bf16_and_no_sync():
    model = make(torch.bfloat16).cuda()
    opt = O.AdamW(model.parameters(), lr=1e-3)
    data = [(x.cuda(), y.cuda()) for x, y in batches(2, torch.bfloat16)]
    train(model, opt, data[:1])
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside step() raises
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim())


def test_training_example_runs():
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(repo, "examples", "gc_training.py"), "--steps", "20",
                        "--plot", os.devnull], cwd="/tmp", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "without GC" in r.stdout and "with GC" in r.stdout
