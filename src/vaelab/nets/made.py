"""The masked autoencoder of an autoregressive decoder (MADE, Germain et al. 2015): dense layers
whose weight masks make output i depend on inputs 1..i-1 only, here with a context vector
(the latent code) entering the first hidden layer unmasked."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.nets.mlp import ACTIVATIONS


class MaskedLinear(nn.Linear):
    """y = (W * M) u + b for a fixed 0/1 mask M (out_features, in_features)."""

    def __init__(self, mask: torch.Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.linear(u, self.weight * self.mask, self.bias)


def hidden_degrees(size: int, dim: int) -> torch.Tensor:
    """Degrees 1..dim-1 spread evenly over ``size`` hidden units: unit k may read inputs 1..m(k)."""
    return 1 + torch.arange(size) * (dim - 1) // size


class MADE(nn.Module):
    """u (..., dim), c (..., context) -> (..., dim), output i a function of u_1..u_{i-1} and c
    (raster order): masked hidden layers of sizes ``hidden`` (the first also reading c through an
    unmasked dense layer), then a masked output layer; with no hidden layer, a strictly lower-
    triangular dense layer on u plus a dense layer on c. Hidden unit k of degree m(k) reads the
    units of degree <= m(k) below it; output i reads the hidden units of degree < i. ``u`` and
    ``c`` broadcast against each other: the masked product of an image is computed once for all
    its draws of c."""

    def __init__(self, dim: int, hidden: Sequence[int], context: int, activation: str = "relu") -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"An autoregressive decoder needs at least 2 pixels, got {dim}.")
        if any(h <= 0 for h in hidden):
            raise ValueError(f"model.autoregressive lists hidden layer sizes, which must be positive; got {list(hidden)}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.dim = dim
        degrees = [torch.arange(1, dim + 1)] + [hidden_degrees(h, dim) for h in hidden]
        self.layers = nn.ModuleList(
            MaskedLinear(lower.unsqueeze(0) <= upper.unsqueeze(1)) for lower, upper in zip(degrees[:-1], degrees[1:])
        )
        self.output = MaskedLinear(torch.arange(1, dim + 1).unsqueeze(1) > degrees[-1].unsqueeze(0))
        self.context = nn.Linear(context, hidden[0] if hidden else dim)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not self.layers:
            return self.output(u) + self.context(c)
        h = self.activation(self.layers[0](u) + self.context(c))
        for layer in self.layers[1:]:
            h = self.activation(layer(h))
        return self.output(h)
