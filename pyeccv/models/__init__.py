"""Models from the papers, built on pyeccv's ops."""
from .retrieval import RetrievalNet, recall_at_1

__all__ = ["RetrievalNet", "recall_at_1"]
