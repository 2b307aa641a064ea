"""vaelab: an experiment framework for variational autoencoders."""

__version__ = "0.1.0"
