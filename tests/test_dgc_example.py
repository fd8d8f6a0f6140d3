"""The DGC example (python -m pyeccv.examples.dgc): its narrow official-class twin against
dgc_resnet18(width=...), its data, and a tiny end-to-end run (train, evaluate, time three models)."""
import math

import torch

from pyeccv.examples import dgc as example
from pyeccv.models import dgc_resnet18
from pyeccv.nn import DynamicGroupConv2d
from pyeccv.reference import dyn_group_conv as ref


def test_official_twin_loads_dgc_resnet18_at_any_width():
    """The official-class twin at width w loads dgc_resnet18(stem="cifar", width=w)'s state_dict as it
    is (strict), at the official width 64 and at a narrow one."""
    for width in (64, 12):
        got = dgc_resnet18(10, stem="cifar", width=width).state_dict()
        official = example.NarrowOfficialDyResNet18(width=width, num_classes=10)
        official.load_state_dict(got)  # strict: same keys and shapes
        assert isinstance(official.layer2[0].downsample[0], ref.DynamicMultiHeadConv)


def test_narrow_models_agree_and_dense_twin_shapes(g):
    """Same weights and pruning level: the pyeccv model and the official masked one give the same
    logits in eval mode; the dense ResNet-18 of the same width has the same output shape."""
    saved = ref.DynamicMultiHeadConv.global_progress
    ref.DynamicMultiHeadConv.global_progress = 0.0  # train-mode forwards keep the pruning level set below
    try:
        ours = dgc_resnet18(10, stem="cifar", width=8, gate_factor=0.5)
        for m in ours.modules():
            if isinstance(m, DynamicGroupConv2d):
                m.inactive_channels = m.in_channels // 2
        official = example.NarrowOfficialDyResNet18(width=8, gate_factor=0.5)
        official.load_state_dict(ours.state_dict())
        x = torch.randn(4, 3, 32, 32, generator=g)
        ours.train()
        official.train()
        with torch.no_grad():  # batch statistics: well conditioned for an untrained network
            a, la = ours(x)
            b, lb = official(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert len(la) == len(lb) == 19  # 16 DGC convs + 3 DGC shortcuts
        assert example.DenseResNet18(width=8)(x).shape == (4, 10)
    finally:
        ref.DynamicMultiHeadConv.global_progress = saved


def test_images_deterministic_balanced_and_split():
    x, y = example.make_images(60, seed=3)
    x2, y2 = example.make_images(60, seed=3)
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=10).tolist() == [6] * 10
    assert not torch.equal(example.make_images(60, seed=4)[0], x)
    assert float(x.std()) > 0.3


def test_example_quick_run():
    res = example.main(["--quick", "--threads", "1", "--time-reps", "2"])
    assert set(res) >= {"accuracy", "overflowed", "accuracy_batch_stats", "accuracy_running_stats", "history",
                        "keep", "used",
                        "mmacs_per_image", "times_ms", "logits_rel_err", "same_prediction", "steps", "seconds"}
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["accuracy_batch_stats"] <= 1.0
    assert 0.0 <= res["accuracy_running_stats"] <= 1.0 and res["recalibrated_on"] == 128
    assert 0 <= res["overflowed"] <= 256
    assert res["steps"] == math.ceil(512 / 32) and len(res["history"]) == 1
    # final pruning level: keep = C_in - round(C_in * (1 - gate)) per head, width 8 -> 8, 16, 32, 64
    assert res["keep"] == {8: 2, 16: 4, 32: 8, 64: 16}
    assert all(0 < res["used"][c] <= k for c, k in res["keep"].items())
    assert res["mmacs_per_image"]["kept"] < 0.3 * res["mmacs_per_image"]["dense"]
    assert set(res["times_ms"]) == {"pyeccv", "official-masked", "dense"}
    assert all(t > 0 for t in res["times_ms"].values())
    assert res["logits_rel_err"] < 1e-4 and res["same_prediction"] == 1.0
