"""Lightning callbacks of vaelab."""

from vaelab.callbacks.checkpoint import LastCheckpoint
from vaelab.callbacks.elapsed import ElapsedTime
from vaelab.callbacks.images import ImageLogger
from vaelab.callbacks.rng import RNGState

__all__ = ["ElapsedTime", "ImageLogger", "LastCheckpoint", "RNGState"]
