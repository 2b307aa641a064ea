"""Multilayer perceptron used as encoder and decoder body."""

from __future__ import annotations

from collections.abc import Sequence

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
