"""pyeccv.nn.HungarianMatcher against the official DETR matcher."""
import pytest
import torch

from pyeccv import testing
from pyeccv.nn import HungarianMatcher
from pyeccv.reference.hungarian import detr_cost, detr_matcher


def make(B, Q, K, counts, g, device="cpu", dtype=torch.float32):
    outputs = {"pred_logits": testing.randn(B, Q, K, g=g, dtype=dtype, device=device),
               "pred_boxes": testing.rand(B, Q, 4, g=g, low=0.05, high=0.6, dtype=dtype, device=device)}
    targets = [{"labels": torch.randint(0, K, (n,), generator=g).to(device),
                "boxes": testing.rand(n, 4, g=g, low=0.05, high=0.6, dtype=dtype, device=device)} for n in counts]
    return outputs, targets


def matched_total(outputs, targets, indices, **kw):
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    C = detr_cost(outputs["pred_logits"].double(), outputs["pred_boxes"].double(), labels, boxes.double(), **kw)
    total, start = 0.0, 0
    for b, (i, j) in enumerate(indices):
        total += float(C[b, i, start + j].sum())
        start += len(targets[b]["labels"])
    return total


CASES = [(1, 1, 2, [1]), (2, 10, 5, [3, 0]), (4, 100, 92, [20, 7, 1, 13]), (3, 30, 92, [40, 2, 30])]


@pytest.mark.parametrize("focal", [False, True])
def test_matcher_equals_official(focal, g):
    kw = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0) if focal else dict(cost_class=1.0, cost_bbox=5.0,
                                                                               cost_giou=2.0)
    m = HungarianMatcher(**kw, focal=focal)
    for B, Q, K, counts in CASES:
        outputs, targets = make(B, Q, K, counts, g)
        got = m(outputs, targets)
        want = detr_matcher(outputs, targets, **kw, focal=focal)
        assert len(got) == B
        for (i, j), (wi, wj), n in zip(got, want, counts):
            assert i.dtype == torch.int64 and j.dtype == torch.int64 and i.device.type == "cpu"
            assert len(i) == min(Q, n)
            torch.testing.assert_close(i, wi)  # random outputs: unique optimum, identical indices
            torch.testing.assert_close(j, wj)
        assert abs(matched_total(outputs, targets, got, focal=focal, **kw)
                   - matched_total(outputs, targets, want, focal=focal, **kw)) < 1e-6


def test_matcher_ties_give_equal_total(g):
    # identical predictions for every query: many optimal matchings, totals must agree
    outputs, targets = make(2, 12, 5, [4, 6], g)
    outputs["pred_logits"][:] = outputs["pred_logits"][:, :1]
    outputs["pred_boxes"][:] = outputs["pred_boxes"][:, :1]
    got = HungarianMatcher()(outputs, targets)
    want = detr_matcher(outputs, targets)
    assert abs(matched_total(outputs, targets, got) - matched_total(outputs, targets, want)) < 1e-5


def test_match_all_aux_outputs(g):
    B, Q, K, counts = 3, 20, 10, [4, 0, 9]
    outputs, targets = make(B, Q, K, counts, g)
    outputs["aux_outputs"] = [make(B, Q, K, counts, g)[0] for _ in range(3)]
    m = HungarianMatcher()
    allm = m.match_all(outputs, targets)
    assert len(allm) == 4
    for layer, got in zip([outputs] + outputs["aux_outputs"], allm):
        want = m(layer, targets)
        for (i, j), (wi, wj) in zip(got, want):
            torch.testing.assert_close(i, wi)
            torch.testing.assert_close(j, wj)


def test_matcher_errors(g):
    outputs, targets = make(2, 5, 4, [1, 2], g)
    with pytest.raises(ValueError, match="all costs can't be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match=r"targets must hold one dict per image \(2\)"):
        HungarianMatcher()(outputs, targets[:1])
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[1\]: matrix contains invalid numeric entries"):
        HungarianMatcher()(outputs, targets)


@pytest.mark.cuda
@pytest.mark.parametrize("focal", [False, True])
def test_cuda_matcher_equals_official(focal, g):
    m = HungarianMatcher(focal=focal)
    for B, Q, K, counts in CASES + [(16, 900, 91, [100] * 16)]:
        outputs, targets = make(B, Q, K, counts, g, device="cuda")
        got = m(outputs, targets)
        want = detr_matcher(outputs, targets, focal=focal)
        for (i, j), (wi, wj) in zip(got, want):
            torch.testing.assert_close(i, wi)
            torch.testing.assert_close(j, wj)
