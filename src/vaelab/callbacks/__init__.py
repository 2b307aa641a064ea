"""Lightning callbacks of vaelab."""

from vaelab.callbacks.checkpoint import LastCheckpoint
from vaelab.callbacks.images import ImageLogger
from vaelab.callbacks.rng import RNGState

__all__ = ["ImageLogger", "LastCheckpoint", "RNGState"]
