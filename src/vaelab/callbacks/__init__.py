"""Lightning callbacks of vaelab."""

from vaelab.callbacks.images import ImageLogger

__all__ = ["ImageLogger"]
