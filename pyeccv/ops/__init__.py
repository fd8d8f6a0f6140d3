"""torch.library custom ops, one module per core (importing registers the ops)."""
from . import hungarian  # noqa: F401
