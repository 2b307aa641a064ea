"""Deterministic networks (encoders, decoders, classifiers); nothing probabilistic lives here."""

from vaelab.nets.conv import ConvFeatures, ConvImage
from vaelab.nets.made import MADE
from vaelab.nets.mlp import MLP, BatchNorm, JointMLP
from vaelab.nets.networks import NET_TYPES, Decoder, Encoder, at_least_single, dense, net_options

__all__ = [
    "BatchNorm", "ConvFeatures", "ConvImage", "Decoder", "Encoder", "JointMLP", "MADE", "MLP", "NET_TYPES",
    "at_least_single", "dense", "net_options",
]
