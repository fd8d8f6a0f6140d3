"""Models from the papers, built on pyeccv's ops."""
from .dgc_resnet import DGCResNet, dgc_resnet18
from .nerf import NeRF, NeRFMLP, PositionalEncoding, sample_pdf
from .retrieval import RetrievalNet, recall_at_1

__all__ = ["DGCResNet", "dgc_resnet18",
           "NeRF", "NeRFMLP", "PositionalEncoding", "sample_pdf", "RetrievalNet", "recall_at_1"]
