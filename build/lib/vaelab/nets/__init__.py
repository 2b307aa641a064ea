"""Deterministic networks (encoders, decoders, classifiers); nothing probabilistic lives here."""

from vaelab.nets.conv import ConvFeatures, ConvImage
from vaelab.nets.mlp import MLP, ConditionalMLP
from vaelab.nets.networks import NET_TYPES, Decoder, Encoder, net_options

__all__ = ["ConditionalMLP", "ConvFeatures", "ConvImage", "Decoder", "Encoder", "MLP", "NET_TYPES", "net_options"]
