"""Convolutional feature extractor and its mirror image, the upsampling image generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vaelab.nets.mlp import ACTIVATIONS


def downsampled(size: int, layers: int) -> list[int]:
    """Spatial sizes after each of ``layers`` 3x3 stride-2 convolutions with padding 1
    (each rounds size / 2 up): e.g. 28 -> [28, 14, 7, 4], 32 -> [32, 16, 8, 4]."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvFeatures(nn.Sequential):
    """(N, C, H, W) -> (N, features): 3x3 stride-2 convolutions with ``channels[i]`` output
    channels, each followed by the activation, then flattened (in (C, H, W) order).

    Images and kernels are held channels-last (NHWC), the layout oneDNN and cuDNN compute in:
    on a 2-core AVX2 CPU M2's convolutions (228 MNIST images a step) train 1.17x faster
    (benchmarks/step_profile.py). ``memory_format`` sets the layout (torch.contiguous_format: NCHW)."""

    memory_format = torch.channels_last

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], activation: str) -> None:
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for n_in, n_out in zip([c, *channels[:-1]], channels):
            layers += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), ACTIVATIONS[activation]()]
        super().__init__(*layers, nn.Flatten())
        heights, widths = downsampled(h, len(channels)), downsampled(w, len(channels))
        self.out_shape = (channels[-1], heights[-1], widths[-1])
        self.out_features = channels[-1] * heights[-1] * widths[-1]
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (channels-last strides apply to 4-d batches)
            x = x.contiguous(memory_format=self.memory_format)
        return super().forward(x)


class ConvImage(nn.Sequential):
    """(N, features) -> (N, *output_shape): the mirror of ``ConvFeatures`` for an image of
    ``output_shape``: the features are reshaped to the smallest feature map and 3x3 stride-2
    transposed convolutions (output padding chosen to hit each size exactly) grow it back;
    the last one emits ``output_shape[0]`` channels with no activation after it."""

    def __init__(self, output_shape: Sequence[int], channels: Sequence[int], activation: str) -> None:
        c, h, w = output_shape
        heights, widths = downsampled(h, len(channels)), downsampled(w, len(channels))
        self.in_features = channels[-1] * heights[-1] * widths[-1]
        layers: list[nn.Module] = [ACTIVATIONS[activation](), nn.Unflatten(-1, (channels[-1], heights[-1], widths[-1]))]
        outs = [*reversed(channels[:-1]), c]
        for i, (n_in, n_out) in enumerate(zip(reversed(channels), outs)):
            level = len(channels) - 1 - i  # grows sizes[level + 1] to sizes[level]
            padding = (heights[level] - 2 * heights[level + 1] + 1, widths[level] - 2 * widths[level + 1] + 1)
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.ConvTranspose2d(n_in, n_out, 3, stride=2, padding=1, output_padding=padding))
        super().__init__(*layers)
