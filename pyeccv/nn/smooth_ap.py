"""Smooth-AP as an nn.Module, with an optional cross-rank retrieval set."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.smooth_ap import _check_args, mean_ap_loss, smooth_ap_fwd, smooth_ap_loss


class SmoothAPLoss(nn.Module):
    """Smooth-AP loss (Brown et al., ECCV 2020); see pyeccv.smooth_ap_loss for the semantics.

    gather_distributed=True, under an initialised torch.distributed process group with more than
    one rank: embeddings and labels of all ranks are all-gathered (torch.distributed.nn's
    autograd-aware all_gather, so gradient flows back to every rank's local shard) and each rank's
    own queries are ranked against the global batch, as fast-reid does. Ranks may hold different
    batch sizes. With DDP's gradient averaging, N ranks then train exactly like one process on the
    concatenated batch. Outside a process group it is the plain loss.
    """

    def __init__(self, temperature: float = 0.01, formulation: str = "official", gather_distributed: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = float(temperature)
        self.formulation = formulation
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, formulation={self.formulation!r}, "
                f"gather_distributed={self.gather_distributed}")

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        _check_args(embeddings, labels, self.temperature, self.formulation)
        dist = torch.distributed
        if not (self.gather_distributed and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return smooth_ap_loss(embeddings, labels, temperature=self.temperature, formulation=self.formulation,
                                  backend=self.backend)
        items, all_labels, offset = _gather(embeddings, labels)
        B = embeddings.shape[0]
        query_index = torch.arange(B, device=embeddings.device) + offset
        ap, valid, _ = smooth_ap_fwd(embeddings, items, all_labels, query_index, self.temperature,
                                     self.formulation == "paper", self.backend)
        return mean_ap_loss(ap, valid)


def _gather(embeddings: Tensor, labels: Tensor):
    """All ranks' embeddings (autograd-aware) and labels, concatenated in rank order, and this
    rank's offset in that order. Batches may differ in size: padded to the largest, then trimmed."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = top - embeddings.shape[0]
    emb = torch.cat([embeddings, embeddings.new_zeros(pad, embeddings.shape[1])]) if pad else embeddings
    lab = torch.cat([labels, labels.new_zeros(pad)]) if pad else labels
    embs = all_gather(emb)  # differentiable: backward sums every rank's gradient into its shard
    labs = [torch.empty_like(lab) for _ in range(world)]
    dist.all_gather(labs, lab.contiguous())
    items = torch.cat([e[:n] for e, n in zip(embs, sizes)])
    all_labels = torch.cat([l[:n] for l, n in zip(labs, sizes)])
    return items, all_labels, sum(sizes[:rank])
