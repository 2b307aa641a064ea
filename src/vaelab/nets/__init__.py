"""Deterministic networks (encoders, decoders, classifiers); nothing probabilistic lives here."""

from vaelab.nets.conv import ConvFeatures, ConvImage
from vaelab.nets.mlp import MLP, BatchNorm, JointMLP
from vaelab.nets.networks import NET_TYPES, Decoder, Encoder, dense, net_options

__all__ = ["BatchNorm", "ConvFeatures", "ConvImage", "Decoder", "Encoder", "JointMLP", "MLP", "NET_TYPES", "dense", "net_options"]
