"""pyeccv.nn.SmoothAPLoss, including the cross-rank retrieval set under torch.distributed (gloo)."""
import os
import subprocess
import sys

import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.nn import SmoothAPLoss
from pyeccv.ops.smooth_ap import mean_ap_loss, smooth_ap_fwd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_module_equals_function(g):
    x = torch.nn.functional.normalize(testing.randn(12, 5, g=g), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(3)
    m = SmoothAPLoss(temperature=0.02, formulation="paper", gather_distributed=True)  # no process group: plain
    assert "gather_distributed=True" in repr(m)
    torch.testing.assert_close(m(x, labels), pyeccv.smooth_ap_loss(x, labels, temperature=0.02, formulation="paper"))


def _worker(rank, world, x_all, labels_all, sizes, formulation):
    start = sum(sizes[:rank])
    x = x_all[start:start + sizes[rank]].clone().requires_grad_()
    loss = SmoothAPLoss(temperature=0.03, formulation=formulation, gather_distributed=True)(
        x, labels_all[start:start + sizes[rank]])
    loss.backward()
    return float(loss), x.grad.numpy().copy()


def _run(x_all, labels_all, sizes, formulation):
    out = testing.run_distributed(_worker, len(sizes), x_all, labels_all, sizes, formulation)
    return {r: (l, torch.from_numpy(g)) for r, (l, g) in enumerate(out)}


def _expected(x_all, labels_all, sizes, formulation):
    """One process: each rank's loss over its own queries, all ranked against the whole batch, and
    the gradient of their sum (what the all-gather's backward delivers to every shard)."""
    x = x_all.clone().requires_grad_()
    losses, total, start = [], 0, 0
    for n in sizes:
        qi = torch.arange(start, start + n)
        ap, valid, _ = smooth_ap_fwd(x[start:start + n], x, labels_all, qi, 0.03, formulation == "paper", "auto")
        lr = mean_ap_loss(ap, valid)
        losses.append(lr.detach())
        total = total + lr
        start += n
    total.backward()
    return losses, x.grad


@pytest.mark.parametrize("formulation", ["official", "paper"])
@pytest.mark.parametrize("sizes", [[8, 8], [9, 4]])
def test_two_gloo_ranks(formulation, sizes, g):
    B = sum(sizes)
    x_all = torch.nn.functional.normalize(testing.randn(B, 6, g=g), dim=1)
    labels_all = torch.randint(0, 4, (B,), generator=g)
    got = _run(x_all, labels_all, sizes, formulation)
    losses, grad = _expected(x_all, labels_all, sizes, formulation)
    for r in range(2):
        torch.testing.assert_close(torch.tensor(got[r][0], dtype=torch.float32), losses[r])
    torch.testing.assert_close(torch.cat([got[0][1], got[1][1]]), grad, rtol=1e-5, atol=1e-6)
    if formulation == "official" and sizes[0] == sizes[1]:
        # equal shards: the mean of the rank losses is the one-process loss on the whole batch, and
        # each shard's gradient is 2x its gradient there (DDP's averaging makes them equal)
        x = x_all.clone().requires_grad_()
        loss = pyeccv.smooth_ap_loss(x, labels_all, temperature=0.03)
        loss.backward()
        torch.testing.assert_close((losses[0] + losses[1]) / 2, loss.detach())
        torch.testing.assert_close(grad, 2 * x.grad, rtol=1e-5, atol=1e-6)


def test_retrieval_example_recall_rises():
    r = subprocess.run([sys.executable, os.path.join(REPO, "examples", "smooth_ap_retrieval.py"), "--steps", "40"],
                       cwd="/tmp", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {l.split(":")[0]: float(l.split(":")[1].split()[0]) for l in r.stdout.splitlines() if "Recall@1" in l}
    before, after = lines["Recall@1 before training"], lines["Recall@1 after training"]
    assert after > before + 0.2, r.stdout


def test_retrieval_net_shapes():
    from pyeccv.models import RetrievalNet

    for backbone in ("cnn", "resnet"):
        net = RetrievalNet(embedding_dim=24, backbone=backbone, width=8)
        e = net(torch.randn(5, 3, 32, 32))
        assert e.shape == (5, 24)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="backbone must be"):
        RetrievalNet(backbone="vit")
