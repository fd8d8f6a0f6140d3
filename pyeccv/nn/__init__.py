"""nn.Modules over pyeccv's ops."""
from .hungarian import HungarianMatcher
from .smooth_ap import SmoothAPLoss

__all__ = ["HungarianMatcher", "SmoothAPLoss"]
