"""Deterministic networks (encoders, decoders, classifiers); nothing probabilistic lives here."""

from vaelab.nets.mlp import MLP, ConditionalMLP

__all__ = ["MLP", "ConditionalMLP"]
