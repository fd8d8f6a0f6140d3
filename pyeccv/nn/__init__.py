"""nn.Modules over pyeccv's ops."""
from .hungarian import HungarianMatcher

__all__ = ["HungarianMatcher"]
