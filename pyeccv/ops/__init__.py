"""torch.library custom ops, one module per core (importing registers the ops)."""
from . import cond_mask_head, dyn_group_conv, grad_central, hungarian, smooth_ap, volume_render  # noqa: F401
