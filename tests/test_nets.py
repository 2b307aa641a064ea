"""Encoders and decoders for every network type, image shape and class conditioning."""

from __future__ import annotations

import pytest
import torch

from vaelab.nets import Decoder, Encoder, net_options

SPECS = [{"type": "mlp", "hidden": [32, 16]}, {"type": "conv", "channels": [8, 16], "hidden": [24]}]
SHAPES = [(1, 28, 28), (3, 32, 32), (2, 21, 18)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_shapes_round_trip(spec, shape):
    encoder, decoder = Encoder(spec, shape, 10), Decoder(spec, 5, (2 * shape[0], *shape[1:]))
    assert encoder(torch.rand(4, *shape)).shape == (4, 10)
    assert decoder(torch.randn(4, 5)).shape == (4, 2 * shape[0], *shape[1:])
    z = torch.randn(3, 4, 5)  # leading dimensions are batch dimensions
    torch.testing.assert_close(decoder(z)[1], decoder(z[1]))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_conditional_networks_enumerate_classes_like_one_class_at_a_time(spec):
    torch.manual_seed(0)
    encoder, decoder = Encoder(spec, (3, 32, 32), 6, num_classes=4), Decoder(spec, 3, (3, 32, 32), num_classes=4)
    x = torch.rand(5, 3, 32, 32)
    every = encoder.all_classes(x)
    assert every.shape == (4, 5, 6)
    for k in range(4):
        y = torch.full((5,), k)
        torch.testing.assert_close(every[k], encoder(x, y))
    z = torch.randn(5, 3)
    assert not torch.allclose(decoder(z, torch.zeros(5, dtype=torch.long)), decoder(z, torch.ones(5, dtype=torch.long)))
    classes = torch.arange(4).view(4, 1).expand(4, 5)  # (K, B) as M2 decodes every class
    torch.testing.assert_close(decoder(z.expand(4, -1, -1), classes)[2], decoder(z, classes[2]))


def test_conv_encoder_convolves_and_gradients_reach_every_layer():
    encoder = Encoder(SPECS[1], (3, 32, 32), 4)
    assert [type(m).__name__ for m in encoder.features][:2] == ["Conv2d", "ReLU"]
    encoder(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_specs_fill_defaults_and_reject_unknown_values():
    assert net_options(None) == {"type": "mlp", "hidden": (500, 500), "activation": "relu", "batch_norm": False}
    assert net_options({"type": "conv", "hidden": [64]})["channels"] == (32, 64, 128)
    with pytest.raises(ValueError, match=r"Unknown network type 'resnet'; choose one of \['conv', 'mlp'\]"):
        net_options({"type": "resnet"})
    with pytest.raises(ValueError, match=r"net=mlp has no option\(s\) \['channels'\]"):
        net_options({"type": "mlp", "channels": [8]})
    with pytest.raises(ValueError, match="Unknown activation 'gelu2'"):
        net_options({"type": "conv", "activation": "gelu2"})
    with pytest.raises(ValueError, match="non-empty list of positive channels"):
        net_options({"type": "conv", "channels": []})
