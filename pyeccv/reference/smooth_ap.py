"""References for Smooth-AP (Brown et al., ECCV 2020, arXiv 2007.12163).

`official_smooth_ap` follows Andrew-Brown1/Smooth_AP `src/Smooth_AP_loss.py` operation for
operation: the B x B x B difference tensor for the whole retrieval set, a C x P x P x P one for the
positives, labels implied by the layout (C classes x P samples, contiguous, equal sizes). It is
the oracle at official layouts and the benchmark baseline.

`loop_smooth_ap` is a plain per-query loop for any labels and both formulations; O(B) memory per
query. Semantics (S = X X^T, sigma(d) = 1 / (1 + exp(clamp(-d / tau, -50, 50)))):
  R_all(i, j) = 1 + sum_{k in Omega(i), k != j} sigma(S_ik - S_ij)
  R_pos(i, j) = 1 + sum_{k in P(i),     k != j} sigma(S_ik - S_ij)
  AP_i = 1/|P(i)| sum_{j in P(i)} R_pos(i, j) / R_all(i, j),   loss = 1 - mean_i AP_i
"official": Omega(i) = the whole batch and P(i) = i's class, the query itself included in both.
"paper": the query is excluded from both; queries with no other positive leave the mean.
"""
from __future__ import annotations

import torch


def sigmoid(x: torch.Tensor, temp: float) -> torch.Tensor:
    """The official sigmoid: exponent clamped to [-50, 50]."""
    exponent = torch.clamp(-x / temp, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def official_smooth_ap(preds: torch.Tensor, num_id: int, anneal: float = 0.01) -> torch.Tensor:
    """The official loss; preds (B, D) holds num_id classes of B // num_id samples, contiguous."""
    batch_size, feat_dims = preds.shape
    group = batch_size // num_id
    dev = preds.device
    # ranking of every item in the whole retrieval set (B x B x B)
    mask = 1.0 - torch.eye(batch_size, device=dev, dtype=preds.dtype)
    mask = mask.unsqueeze(dim=0).repeat(batch_size, 1, 1)
    sim_all = torch.mm(preds, preds.t())
    sim_all_repeat = sim_all.unsqueeze(dim=1).repeat(1, batch_size, 1)
    sim_diff = sim_all_repeat - sim_all_repeat.permute(0, 2, 1)
    sim_sg = sigmoid(sim_diff, temp=anneal) * mask
    sim_all_rk = torch.sum(sim_sg, dim=-1) + 1
    # ranking inside the positive set only (C x P x P x P)
    xs = preds.view(num_id, group, feat_dims)
    pos_mask = 1.0 - torch.eye(group, device=dev, dtype=preds.dtype)
    pos_mask = pos_mask.unsqueeze(dim=0).unsqueeze(dim=0).repeat(num_id, group, 1, 1)
    sim_pos = torch.bmm(xs, xs.permute(0, 2, 1))
    sim_pos_repeat = sim_pos.unsqueeze(dim=2).repeat(1, 1, group, 1)
    sim_pos_diff = sim_pos_repeat - sim_pos_repeat.permute(0, 1, 3, 2)
    sim_pos_sg = sigmoid(sim_pos_diff, temp=anneal) * pos_mask
    sim_pos_rk = torch.sum(sim_pos_sg, dim=-1) + 1
    ap = torch.zeros(1, device=dev, dtype=preds.dtype)
    for ind in range(num_id):
        pos_divide = torch.sum(sim_pos_rk[ind] / sim_all_rk[ind * group:(ind + 1) * group,
                                                            ind * group:(ind + 1) * group])
        ap = ap + (pos_divide / group) / batch_size
    return 1 - ap


def loop_ap(queries: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, query_index: torch.Tensor,
            temperature: float, formulation: str):
    """Per-query AP of `queries` ranked against `items`; returns (ap, valid) of shape (Q,)."""
    paper = formulation == "paper"
    aps, valid = [], []
    for q in range(queries.shape[0]):
        self_i = int(query_index[q])
        s = items @ queries[q]  # S_q. (B,)
        same = labels == labels[self_i]
        omega = torch.ones_like(same)
        if paper:
            omega[self_i] = False
            same = same.clone()
            same[self_i] = False
        pos = torch.nonzero(same).flatten()
        if pos.numel() == 0:
            aps.append(s.new_zeros(()))
            valid.append(False)
            continue
        # (|P|, B): sigma(S_qk - S_qj) for every positive j and candidate k, k != j
        sg = sigmoid(s[None, :] - s[pos][:, None], temperature)
        not_j = torch.ones_like(sg, dtype=torch.bool)
        not_j[torch.arange(pos.numel()), pos] = False
        r_all = 1 + (sg * (not_j & omega[None, :])).sum(1)
        r_pos = 1 + (sg * (not_j & same[None, :])).sum(1)
        aps.append((r_pos / r_all).mean())
        valid.append(True)
    return torch.stack(aps), torch.tensor(valid, device=queries.device)


def loop_smooth_ap(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.01,
                   formulation: str = "official") -> torch.Tensor:
    """1 - mean AP over the valid queries, every embedding a query against the whole batch."""
    ap, valid = loop_ap(embeddings, embeddings, labels, torch.arange(embeddings.shape[0]), temperature,
                        formulation)
    if not bool(valid.any()):
        raise ValueError("no query has a positive: every class in the batch has a single sample")
    return 1 - ap[valid].mean()
