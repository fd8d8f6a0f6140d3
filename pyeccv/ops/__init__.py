"""torch.library custom ops, one module per core (importing registers the ops)."""
from . import hungarian, smooth_ap  # noqa: F401
