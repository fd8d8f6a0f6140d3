"""torch.library custom ops, one module per core (importing registers the ops)."""
from . import grad_central, hungarian, smooth_ap  # noqa: F401
