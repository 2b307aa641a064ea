"""Encoders and decoders for every network type, image shape and class conditioning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.nets import BatchNorm, Decoder, Encoder, JointMLP, net_options
from vaelab.nets.conv import ConvFeatures

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


def test_joint_mlp_is_an_mlp_on_the_concatenated_inputs_broadcast_against_each_other():
    """W_1 x + W_2 a + W_y[:, y] with x (B, 4) shared by the draws a (S, B, 3): the first layer of an
    MLP on [x; a; onehot(y)]; ``all_classes`` gives every y."""
    torch.manual_seed(0)
    net = JointMLP([4, 3], [5], 2, num_classes=3)
    x, a, y = torch.randn(6, 4), torch.randn(2, 6, 3), torch.randint(3, (2, 6))
    joint = torch.cat([x.expand(2, -1, -1), a, F.one_hot(y, 3).float()], -1)
    weight = torch.cat([net.input.weight, net.more[0].weight, net.label.weight.T], 1)
    torch.testing.assert_close(net(x, a, y=y), net.body(joint @ weight.T + net.input.bias))
    every = net.all_classes(x, a)
    assert every.shape == (3, 2, 6, 2)
    torch.testing.assert_close(every[1], net(x, a, y=torch.ones(2, 6, dtype=torch.long)))


def test_batch_norm_normalises_over_every_leading_dimension():
    """net.batch_norm=true: a BatchNorm before each hidden activation, whose statistics in training
    cover samples, classes and examples alike."""
    torch.manual_seed(0)
    encoder = Encoder({"type": "mlp", "hidden": [8, 8], "batch_norm": True}, (1, 6, 6), 4, num_classes=3, more=[2])
    assert sum(isinstance(m, BatchNorm) for m in encoder.modules()) == 2
    norm = BatchNorm(5)
    h = torch.randn(3, 2, 7, 5) * 4 + 1
    out = norm(h)
    torch.testing.assert_close(out.mean((0, 1, 2)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.flatten(0, 2).var(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    norm.eval()  # the running statistics afterwards: deterministic, one example at a time
    torch.testing.assert_close(norm(h)[1, 0], norm(h[1, 0]))
    encoder.eval()  # trainer.sync_batchnorm=true swaps in SyncBatchNorm, which takes the same (N, C) inputs
    x, a = torch.rand(5, 1, 6, 6), torch.randn(2, 5, 2)
    before = encoder.all_classes(x, more=(a,))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 2
    torch.testing.assert_close(synced.all_classes(x, more=(a,)), before)


def test_conv_features_compute_channels_last_what_nchw_computes():
    torch.manual_seed(0)
    nhwc = ConvFeatures((1, 28, 28), [8, 16], "relu")
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    nchw = copy.deepcopy(nhwc)
    nchw.memory_format = torch.contiguous_format
    nchw.to(memory_format=torch.contiguous_format)
    x = torch.rand(5, 1, 28, 28)
    out, reference = nhwc(x), nchw(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)  # the same features, in (C, H, W) order
    out.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(nhwc[0].weight.grad, nchw[0].weight.grad, rtol=1e-4, atol=1e-5)
