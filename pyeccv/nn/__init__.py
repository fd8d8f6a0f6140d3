"""nn.Modules over pyeccv's ops."""
from . import functional
from .cond_inst import CondInstMaskBranch, DynamicMaskHead
from .dgc import DynamicGroupConv2d
from .hungarian import HungarianMatcher
from .smooth_ap import SmoothAPLoss

__all__ = ["CondInstMaskBranch", "DynamicGroupConv2d", "DynamicMaskHead",
           "HungarianMatcher", "SmoothAPLoss", "functional"]
