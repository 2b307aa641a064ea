"""Encoders, decoders and classifiers built from a network spec (``model.net`` in the config:
``net=mlp`` or ``net=conv``), for any image shape and with or without a class input."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vaelab.nets.conv import ConvFeatures, ConvImage
from vaelab.nets.mlp import ACTIVATIONS, MLP, JointMLP

# every option of each network type, with its default (both: batch_norm, batch normalisation
# before the activation of every hidden dense layer)
NET_TYPES: dict[str, dict] = {
    # dense layers between the flattened image and the latent code (mirrored in the decoder)
    "mlp": {"hidden": (500, 500), "activation": "relu", "batch_norm": False},
    # 3x3 stride-2 convolutions with these channels, then dense hidden layers
    "conv": {"channels": (32, 64, 128), "hidden": (512,), "activation": "relu", "batch_norm": False},
}


def net_options(spec: Mapping | None) -> dict:
    """A complete, checked network spec: ``{"type": ..., **options}`` with defaults filled in."""
    spec = dict(spec or {"type": "mlp"})
    kind = spec.pop("type", None)
    if kind not in NET_TYPES:
        raise ValueError(f"Unknown network type {kind!r}; choose one of {sorted(NET_TYPES)} (net=...).")
    unknown = set(spec) - set(NET_TYPES[kind])
    if unknown:
        raise ValueError(f"net={kind} has no option(s) {sorted(unknown)}; its options are {sorted(NET_TYPES[kind])}.")
    options = {**NET_TYPES[kind], **spec}
    if options["activation"] not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {options['activation']!r}; choose one of {sorted(ACTIVATIONS)}.")
    if kind == "conv" and (not options["channels"] or min(options["channels"]) <= 0):
        raise ValueError(f"net=conv needs a non-empty list of positive channels, got {options['channels']}.")
    return {"type": kind, **options}


def at_least_single(out: torch.Tensor) -> torch.Tensor:
    """A network's outputs in at least float32: under bf16/fp16 mixed precision the layers run
    in half precision, but the distributions built on their outputs sum hundreds of terms
    (log p(x|z) over pixels, the KL over z), which half precision would round to ~0.5 nats."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def dense(in_features: int | Sequence[int], out_features: int, options: Mapping, num_classes: int | None = None, reverse: bool = False) -> nn.Module:
    """The dense layers of a network spec (``options`` from ``net_options``; ``reverse``: its
    hidden sizes mirrored, as in a decoder), on one input or on the concatenation of several
    (``in_features`` a list) and the class y with ``num_classes`` (``JointMLP``)."""
    hidden = list(reversed(options["hidden"])) if reverse else list(options["hidden"])
    if isinstance(in_features, int) and num_classes is None:
        return MLP(in_features, hidden, out_features, options["activation"], options["batch_norm"])
    sizes = [in_features] if isinstance(in_features, int) else list(in_features)
    return JointMLP(sizes, hidden, out_features, options["activation"], num_classes, options["batch_norm"])


class Encoder(nn.Module):
    """x [, y] [, more] -> (..., out_features): image features (the flattened pixels for
    ``mlp``, a convolution stack for ``conv``), then dense layers. With ``num_classes`` the class
    enters the first dense layer, so ``all_classes`` computes the features once; ``more`` names
    the sizes of further vector inputs that enter it too (an auxiliary or latent variable), each
    with leading dimensions that broadcast against the image batch (``JointMLP``)."""

    def __init__(
        self, spec: Mapping | None, input_shape: Sequence[int], out_features: int, num_classes: int | None = None, more: Sequence[int] = ()
    ) -> None:
        super().__init__()
        options = net_options(spec)
        if options["type"] == "conv":
            self.features = ConvFeatures(input_shape, options["channels"], options["activation"])
            n_features = self.features.out_features
        else:
            self.features, n_features = nn.Flatten(), math.prod(input_shape)
        self.head = dense([n_features, *more] if more else n_features, out_features, options, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, more: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        h = self.features(x)
        return at_least_single(self.head(h) if y is None and not more else self.head(h, *more, y=y))

    def all_classes(self, x: torch.Tensor, more: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """(B, *input_shape) -> (K, ..., B, out_features), row k with y = k."""
        return at_least_single(self.head.all_classes(self.features(x), *more))


class Decoder(nn.Module):
    """z [, y] -> (N, *output_shape): dense layers (the class entering the first), then for
    ``conv`` transposed convolutions up to the image size, for ``mlp`` a reshape."""

    def __init__(self, spec: Mapping | None, z_dim: int, output_shape: Sequence[int], num_classes: int | None = None) -> None:
        super().__init__()
        options = net_options(spec)
        if options["type"] == "conv":
            self.image = ConvImage(output_shape, options["channels"], options["activation"])
            n_features = self.image.in_features
        else:
            self.image, n_features = nn.Unflatten(-1, tuple(output_shape)), math.prod(output_shape)
        self.head = dense(z_dim, n_features, options, num_classes, reverse=True)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (..., z_dim), y (...) -> (..., *output_shape); leading dimensions are batch dimensions."""
        flat = z.reshape(-1, z.shape[-1])
        out = self.image(self.head(flat) if y is None else self.head(flat, y=y.reshape(-1)))
        return at_least_single(out.view(*z.shape[:-1], *out.shape[1:]))
