"""Multilayer perceptrons: the dense layers of every encoder, decoder and classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU}


class BatchNorm(nn.Module):
    """Batch normalisation of the last dimension (Ioffe & Szegedy 2015), its statistics taken
    over every leading dimension (samples, classes and examples alike). It holds a plain
    ``BatchNorm1d`` of (N, C) inputs, which ``trainer.sync_batchnorm=true`` may swap for its
    synchronised version."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.reshape(-1, h.shape[-1])).view(h.shape)


def _hidden(features: int, activation: str, batch_norm: bool) -> list[nn.Module]:
    """What follows a hidden dense layer: [batch normalisation,] the activation."""
    return [*([BatchNorm(features)] if batch_norm else []), ACTIVATIONS[activation]()]


class MLP(nn.Sequential):
    """Linear layers of sizes ``in_features -> *hidden -> out_features`` with an activation
    between them (after batch normalisation with ``batch_norm``) and none after the last layer."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu", batch_norm: bool = False
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}."
            )
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers += _hidden(n_in, activation, batch_norm)
            layers.append(nn.Linear(n_in, n_out))
        super().__init__(*layers)


class JointMLP(nn.Module):
    """MLP on the concatenation of several inputs and, with ``num_classes``, the one-hot class:
    [u_1; ...; u_n; onehot(y)]. Its first layer is split as W_1 u_1 + ... + W_n u_n + W_y[:, y],
    so each input is multiplied once and broadcast against the others' leading dimensions (an
    image once for all its draws of a latent variable), and ``all_classes`` evaluates every class
    for the cost of a column lookup (how M2 enumerates y)."""

    def __init__(
        self,
        in_features: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
        num_classes: int | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("A network with a class input or several inputs needs at least one hidden layer.")
        first, *more = in_features
        self.input = nn.Linear(first, hidden[0])
        self.more = nn.ModuleList(nn.Linear(n, hidden[0], bias=False) for n in more)
        self.label = nn.Embedding(num_classes, hidden[0]) if num_classes else None  # the columns W_y[:, y]
        bound = (sum(in_features) + (num_classes or 0)) ** -0.5  # nn.Linear's init for the joint input
        for weight in [self.input.weight, *(layer.weight for layer in self.more), *([self.label.weight] if self.label else [])]:
            nn.init.uniform_(weight, -bound, bound)
        self.body = nn.Sequential(*_hidden(hidden[0], activation, batch_norm), MLP(hidden[0], hidden[1:], out_features, activation, batch_norm))

    def first_layer(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """W_1 u_1 + ... + W_n u_n, the inputs broadcast against each other."""
        h = self.input(inputs[0])
        for layer, u in zip(self.more, inputs[1:], strict=True):
            h = h + layer(u)
        return h

    def forward(self, *inputs: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (..., in_features_i), y (...) class indices -> (..., out_features)."""
        h = self.first_layer(inputs)
        return self.body(h if y is None else h + self.label(y))

    def all_classes(self, *inputs: torch.Tensor) -> torch.Tensor:
        """inputs (..., in_features_i) -> (K, ..., out_features), row k computed with y = k."""
        h = self.first_layer(inputs)
        return self.body(h.unsqueeze(0) + self.label.weight.view(-1, *[1] * (h.dim() - 1), h.shape[-1]))
