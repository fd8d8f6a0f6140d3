"""pyeccv.nn.DynamicMaskHead / CondInstMaskBranch / functional against AdelaiDet's CondInst path
(rebuilt here from pyeccv.reference.cond_mask_head, which follows the official code)."""
import math
from types import SimpleNamespace

import pytest
import torch

import pyeccv
from pyeccv import testing
from pyeccv.nn import CondInstMaskBranch, DynamicMaskHead
from pyeccv.nn import functional as PF
from pyeccv.reference import cond_mask_head as ref


def _reference_op(mask_feats, params, im_inds, locations, soi, *, deterministic=True, backend="auto", **kw):
    return ref.cond_mask_head(mask_feats, params, im_inds, locations, soi, **kw)


@pytest.fixture(autouse=True)
def op(monkeypatch):
    """The modules call pyeccv.cond_mask_head; until the op is installed, the reference stands in."""
    if not hasattr(pyeccv, "cond_mask_head"):
        monkeypatch.setattr(pyeccv, "cond_mask_head", _reference_op, raising=False)


def make_instances(head, N, H, W, I, g, dtype=torch.float64, stride=8, counts=None):
    feats = testing.randn(N, head.in_channels, H, W, g=g, dtype=dtype)
    inst = SimpleNamespace(
        mask_head_params=testing.randn(I, head.num_gen_params, g=g, dtype=dtype) * 0.5,
        im_inds=torch.randint(0, N, (I,), generator=g),
        locations=testing.rand(I, 2, g=g, low=0.0, high=float(stride * max(H, W)), dtype=torch.float32),
        fpn_levels=torch.randint(0, len(head.sizes_of_interest), (I,), generator=g))
    counts = counts or [3] * N
    r = stride // head.mask_out_stride
    gts = [SimpleNamespace(gt_bitmasks=(testing.rand(c, H * r, W * r, g=g) > 0.5).float()) for c in counts]
    inst.gt_inds = torch.randint(0, sum(counts), (I,), generator=g)
    return feats, inst, gts


def official_logits(head, feats, stride, inst):
    """AdelaiDet's mask_heads_forward_with_coords: grouped convs, then aligned_bilinear."""
    n, (_, _, H, W) = inst.mask_head_params.shape[0], feats.shape
    soi = head.sizes_of_interest.float()[inst.fpn_levels]
    logits = ref.cond_mask_head(feats, inst.mask_head_params, inst.im_inds, inst.locations, soi, feat_stride=stride,
                                num_layers=head.num_layers, channels=head.channels,
                                rel_coords=not head.disable_rel_coords)
    return ref.aligned_bilinear(logits.reshape(n, 1, H, W), int(stride / head.mask_out_stride))


ADELAIDET_CFG = {"MODEL": {
    "CONDINST": {"MASK_OUT_STRIDE": 8, "MASK_HEAD": {"NUM_LAYERS": 4, "CHANNELS": 16, "DISABLE_REL_COORDS": True},
                 "MASK_BRANCH": {"OUT_CHANNELS": 12, "IN_FEATURES": ["p3", "p4"], "CHANNELS": 32,
                                 "NORM": "GN", "NUM_CONVS": 2, "SEMANTIC_LOSS_ON": False}},
    "FCOS": {"SIZES_OF_INTEREST": [32, 64]},
    "BOXINST": {"ENABLED": False}}}


def _namespace(d):
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ---- DynamicMaskHead --------------------------------------------------------------------------
def test_defaults_and_state_dict():
    head = DynamicMaskHead()
    assert head.num_gen_params == 169
    assert head.weight_nums == [80, 64, 8] and head.bias_nums == [8, 8, 1]
    sd = head.state_dict()
    assert set(sd) == {"sizes_of_interest", "_iter"}
    # the official buffers: SOI + [2 * last] from a list of ints (int64), _iter a float zeros([1])
    assert torch.equal(sd["sizes_of_interest"], torch.tensor([64, 128, 256, 512, 1024]))
    assert sd["sizes_of_interest"].dtype == torch.int64
    assert torch.equal(sd["_iter"], torch.zeros(1))
    head.load_state_dict({"sizes_of_interest": torch.tensor([64, 128, 256, 512, 1024]), "_iter": torch.tensor([7.0])})
    assert float(head._iter) == 7.0
    assert "num_gen_params=169" in repr(head)
    assert DynamicMaskHead(disable_rel_coords=True).num_gen_params == 153
    assert DynamicMaskHead(channels=16, num_layers=2).num_gen_params == 10 * 16 + 16 + 16 + 1


@pytest.mark.parametrize("form", ["nested", "namespace", "flat"])
def test_from_config(form):
    cfg = {"nested": ADELAIDET_CFG, "namespace": _namespace(ADELAIDET_CFG), "flat": _flat(ADELAIDET_CFG)}[form]
    head = DynamicMaskHead.from_config(cfg)
    assert (head.num_layers, head.channels, head.in_channels, head.mask_out_stride) == (4, 16, 12, 8)
    assert head.disable_rel_coords
    assert torch.equal(head.sizes_of_interest, torch.tensor([32, 64, 128]))
    assert head.num_gen_params == 12 * 16 + 16 * 16 * 2 + 16 + 16 * 3 + 1
    branch = CondInstMaskBranch.from_config(cfg, {"p3": SimpleNamespace(channels=64, stride=8),
                                                  "p4": SimpleNamespace(channels=64, stride=16)})
    assert branch.in_features == ["p3", "p4"] and branch.out_stride == 8 and branch.num_outputs == 12
    assert isinstance(branch.tower[0][1], torch.nn.GroupNorm) and len(branch.tower) == 3
    # a config missing keys takes AdelaiDet's defaults
    assert DynamicMaskHead.from_config({}).num_gen_params == 169


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        DynamicMaskHead(num_layers=1)
    with pytest.raises(ValueError, match="channels"):
        DynamicMaskHead(channels=0)
    with pytest.raises(NotImplementedError, match="BoxInst"):
        DynamicMaskHead.from_config({"MODEL.BOXINST.ENABLED": True})
    with pytest.raises(NotImplementedError, match="semantic"):
        CondInstMaskBranch(16, sem_loss_on=True)
    with pytest.raises(ValueError, match="norm"):
        CondInstMaskBranch(16, norm="LN")
    head = DynamicMaskHead().eval()
    feats, inst, _ = make_instances(head, 1, 4, 4, 2, testing.generator(0))
    with pytest.raises(ValueError, match="mask_feat_stride"):
        head.mask_heads_forward_with_coords(feats, 6, inst)
    with pytest.raises(ValueError, match="mask_feat_stride"):
        head.mask_heads_forward_with_coords(feats, 2, inst)


# (N, H, W, I, mask_out_stride, disable_rel_coords, num_layers, channels)
CASES = [(2, 7, 6, 5, 4, False, 3, 8), (1, 5, 5, 1, 8, False, 3, 8), (3, 6, 9, 7, 4, True, 3, 8),
         (2, 4, 5, 6, 2, False, 2, 16)]


@pytest.mark.parametrize("case", CASES)
def test_module_equals_official_path(case, g):
    N, H, W, I, mos, no_rel, L, ch = case
    head = DynamicMaskHead(channels=ch, num_layers=L, mask_out_stride=mos, disable_rel_coords=no_rel).double()
    feats, inst, _ = make_instances(head, N, H, W, I, g, stride=8)
    feats.requires_grad_()
    inst.mask_head_params.requires_grad_()
    got = head.mask_heads_forward_with_coords(feats, 8, inst)
    want = official_logits(head, feats, 8, inst)
    r = 8 // mos
    assert got.shape == (I, 1, H * r, W * r)
    testing.assert_close(got, want, "reduction")
    cot = testing.randn(*got.shape, g=g, dtype=torch.float64)
    g_got = torch.autograd.grad(got, (feats, inst.mask_head_params), cot)
    g_want = torch.autograd.grad(want, (feats, inst.mask_head_params), cot)
    testing.assert_close(g_got[0], g_want[0], "reduction", name="d mask_feats")
    testing.assert_close(g_got[1], g_want[1], "reduction", name="d params")


def test_module_float32_against_float64_official(g):
    head = DynamicMaskHead()
    feats, inst, _ = make_instances(head, 2, 10, 12, 9, g, dtype=torch.float32)
    got = head.mask_heads_forward_with_coords(feats, 8, inst)
    assert got.dtype == torch.float32
    inst64 = SimpleNamespace(**vars(inst))
    inst64.mask_head_params = inst.mask_head_params.double()
    testing.assert_close(got, official_logits(head, feats.double(), 8, inst64), "reduction", dtype=torch.float32)


def test_training_loss_and_backward(g):
    head = DynamicMaskHead().double().train()
    feats, inst, gts = make_instances(head, 2, 6, 5, 7, g, counts=[4, 2])
    feats.requires_grad_()
    inst.mask_head_params.requires_grad_()
    losses = head(feats, 8, inst, gts)
    assert set(losses) == {"loss_mask"} and float(head._iter) == 1.0
    loss = losses["loss_mask"]
    gt = torch.cat([x.gt_bitmasks for x in gts])[inst.gt_inds].unsqueeze(1).double()
    want = ref.dice_coefficient(official_logits(head, feats, 8, inst).sigmoid(), gt).mean()
    testing.assert_close(loss, want, "reduction")
    assert math.isfinite(loss.item()) and 0.0 < loss.item() < 1.0
    loss.backward()
    for name, t in (("mask_feats", feats), ("params", inst.mask_head_params)):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()), name
        assert float(t.grad.abs().sum()) > 0, name
    head(feats.detach(), 8, inst, gts)
    assert float(head._iter) == 2.0


def test_zero_instances(g):
    head = DynamicMaskHead().train()
    feats, inst, gts = make_instances(head, 2, 4, 4, 0, g, dtype=torch.float32)
    feats.requires_grad_()
    inst.mask_head_params.requires_grad_()
    loss = head(feats, 8, inst, gts)["loss_mask"]
    assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    assert inst.mask_head_params.grad.shape == (0, 169)
    head.eval()
    out = head(feats, 8, inst)
    assert out is inst and not hasattr(out, "pred_global_masks")
    # zero instances through the head itself: an empty (0, 1, 2H, 2W)
    assert head.mask_heads_forward_with_coords(feats, 8, inst).shape == (0, 1, 8, 8)


def test_inference_masks(g):
    head = DynamicMaskHead().eval()
    feats, inst, _ = make_instances(head, 3, 9, 7, 6, g, dtype=torch.float32)
    with torch.no_grad():
        out = head(feats, 8, inst)
    masks = out.pred_global_masks
    assert masks.shape == (6, 1, 18, 14) and masks.dtype == torch.float32
    # probabilities; float32 sigmoid rounds to exactly 1.0 for logits above ~17 (CI drew seed 3202768154)
    assert bool(((masks >= 0) & (masks <= 1)).all())
    with torch.no_grad():
        want = official_logits(head, feats.double(), 8, SimpleNamespace(
            **{**vars(inst), "mask_head_params": inst.mask_head_params.double()})).sigmoid()
    testing.assert_close(masks, want, "reduction", dtype=torch.float32)


def test_training_requires_gt(g):
    head = DynamicMaskHead().train()
    feats, inst, _ = make_instances(head, 1, 4, 4, 2, g, dtype=torch.float32)
    with pytest.raises(ValueError, match="gt_instances"):
        head(feats, 8, inst)


# ---- CondInstMaskBranch -----------------------------------------------------------------------
def _features(g, N=2, C=16, H=16, W=12):
    return {"p3": testing.randn(N, C, H, W, g=g), "p4": testing.randn(N, C, H // 2, W // 2, g=g),
            "p5": testing.randn(N, C, H // 4, W // 4, g=g)}


@pytest.mark.parametrize("norm", ["BN", None, "GN"])
def test_mask_branch_shape_and_math(norm, g):
    feats = _features(g, C=16)
    branch = CondInstMaskBranch({"p3": 16, "p4": 16, "p5": 16}, channels=32, num_convs=2, out_channels=8, norm=norm)
    branch.eval()
    mask_feats, losses = branch(feats)
    assert losses == {}
    assert mask_feats.shape == (2, 8, 16, 12)  # the stride of p3
    x = branch.refine[0](feats["p3"])
    x = x + ref.aligned_bilinear(branch.refine[1](feats["p4"]), 2)
    x = x + ref.aligned_bilinear(branch.refine[2](feats["p5"]), 4)
    torch.testing.assert_close(mask_feats, branch.tower(x))


def test_mask_branch_state_dict_and_init():
    branch = CondInstMaskBranch([16, 24, 32], num_convs=4, out_channels=8, norm="BN")
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    want = set()
    for prefix in ["refine.0", "refine.1", "refine.2"] + [f"tower.{i}" for i in range(4)]:
        want |= {f"{prefix}.0.weight"} | {f"{prefix}.1.{k}" for k in bn}
    want |= {"tower.4.weight", "tower.4.bias"}
    assert set(branch.state_dict()) == want
    assert branch.refine[1][0].weight.shape == (128, 24, 3, 3)
    assert branch.tower[4].weight.shape == (8, 128, 1, 1)
    # conv_with_kaiming_uniform: kaiming_uniform_(a=1) -> bound sqrt(3 / fan_in); zero bias without norm
    w = branch.refine[2][0].weight.detach()
    assert float(w.abs().max()) <= math.sqrt(3.0 / (32 * 9)) and float(w.abs().max()) > 0.5 * math.sqrt(3.0 / (32 * 9))
    plain = CondInstMaskBranch(16, norm=None)
    blocks = ["refine.0", "refine.1", "refine.2"] + [f"tower.{i}" for i in range(4)]
    assert set(plain.state_dict()) == {f"{b}.0.{p}" for b in blocks for p in ("weight", "bias")} | {
        "tower.4.weight", "tower.4.bias"}
    assert torch.equal(plain.refine[0][0].bias, torch.zeros(128))
    assert CondInstMaskBranch(16, norm="").refine[0][0].bias is not None


def test_mask_branch_bad_sizes(g):
    branch = CondInstMaskBranch(16, channels=16, num_convs=1)
    feats = _features(g)
    feats["p5"] = feats["p5"][..., :2]
    with pytest.raises(ValueError, match="p5"):
        branch(feats)
    with pytest.raises(ValueError, match="in_channels"):
        CondInstMaskBranch([16, 16])
    with pytest.raises(ValueError, match="in_channels"):
        CondInstMaskBranch({"p3": 16, "p4": 16})


def test_branch_and_head_end_to_end(g):
    branch = CondInstMaskBranch(16, channels=16, num_convs=2, out_channels=8).train()
    head = DynamicMaskHead().train()
    mask_feats, _ = branch(_features(g, C=16, H=8, W=8))
    _, inst, gts = make_instances(head, 2, 8, 8, 5, g, dtype=torch.float32)
    inst.mask_head_params.requires_grad_()
    loss = head(mask_feats, 8, inst, gts)["loss_mask"]
    loss.backward()
    assert branch.refine[2][0].weight.grad is not None and float(branch.refine[2][0].weight.grad.abs().sum()) > 0
    assert float(inst.mask_head_params.grad.abs().sum()) > 0


# ---- functional -------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_functional_aligned_bilinear(factor, g):
    x = testing.randn(2, 3, 5, 4, g=g, dtype=torch.float64)
    out = PF.aligned_bilinear(x, factor)
    assert out.shape == (2, 3, 5 * factor, 4 * factor)
    assert torch.equal(out, ref.aligned_bilinear(x, factor))
    assert torch.equal(PF.aligned_bilinear(x, float(factor)), out)
    with pytest.raises(ValueError, match="x must be 4-D"):
        PF.aligned_bilinear(x[0], factor)
    for bad in (0, 1.5, -2, True):
        with pytest.raises(ValueError, match="factor"):
            PF.aligned_bilinear(x, bad)


def test_functional_dice_loss(g):
    logits = testing.randn(5, 1, 6, 7, g=g, dtype=torch.float64)
    targets = testing.rand(5, 1, 6, 7, g=g) > 0.5
    per = PF.dice_loss(logits, targets)
    want = ref.dice_coefficient(logits.sigmoid(), targets.double())
    testing.assert_close(per, want, "reduction")
    assert per.shape == (5,)
    testing.assert_close(PF.dice_loss(logits, targets, reduction="mean"), want.mean(), "reduction")
    testing.assert_close(PF.dice_loss(logits, targets, reduction="sum"), want.sum(), "reduction")
    assert PF.dice_loss(logits[:0], targets[:0]).shape == (0,)
    with pytest.raises(ValueError, match="targets"):
        PF.dice_loss(logits, targets[:, :, :5])
    with pytest.raises(ValueError, match="reduction"):
        PF.dice_loss(logits, targets, reduction="batchmean")
    with pytest.raises(ValueError, match="logits"):
        PF.dice_loss(targets, targets)
