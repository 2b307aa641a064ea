"""Multilayer perceptron used as encoder and decoder body."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU}


class MLP(nn.Sequential):
    """Linear layers of sizes ``in_features -> *hidden -> out_features`` with an activation
    between them and none after the last layer."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu"
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}."
            )
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(n_in, n_out))
        super().__init__(*layers)


class ConditionalMLP(nn.Module):
    """MLP on the concatenation [x; onehot(y)]. Its first layer is split as
    W [x; y] = W_x x + W_y[:, y], so ``all_classes(x)`` evaluates every class for the cost of
    one W_x x per input plus a column lookup (how M2 enumerates y)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("ConditionalMLP needs at least one hidden layer.")
        self.input = nn.Linear(in_features, hidden[0])
        self.label = nn.Embedding(num_classes, hidden[0])  # the columns W_y[:, y]
        bound = (in_features + num_classes) ** -0.5  # nn.Linear's init for the joint input
        nn.init.uniform_(self.input.weight, -bound, bound)
        nn.init.uniform_(self.label.weight, -bound, bound)
        self.body = nn.Sequential(ACTIVATIONS[activation](), MLP(hidden[0], hidden[1:], out_features, activation))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features), y: (B,) class indices -> (B, out_features)."""
        return self.body(self.input(x) + self.label(y))

    def all_classes(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) -> (K, B, out_features), row k computed with y = k."""
        return self.body(self.input(x).unsqueeze(0) + self.label.weight.unsqueeze(1))
