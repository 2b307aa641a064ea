"""Lightning callbacks of vaelab."""

from vaelab.callbacks.images import ImageLogger
from vaelab.callbacks.rng import RNGState

__all__ = ["ImageLogger", "RNGState"]
