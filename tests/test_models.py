"""Behaviour every model shares."""

from __future__ import annotations

import pytest
import torch
from torch._inductor import config as inductor_config

from vaelab.lit import LitModel
from vaelab.models import M2, VAE


def _model_and_batch(name: str):
    net = {"type": "mlp", "hidden": [32]}
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    y = torch.arange(8) % 4
    if name == "vae":
        return LitModel(VAE((1, 6, 6), z_dim=3, net=net), compile=True), (x, y)
    model = LitModel(M2((1, 6, 6), num_classes=4, z_dim=3, net=net), alpha=1.0, compile=True, labeled=4, train_size=12)
    return model, {"labeled": (x[:4], y[:4]), "unlabeled": (x[4:], torch.full((4,), -1))}


@pytest.mark.parametrize("name", ["vae", "ssvae"])
def test_compiled_objective_computes_the_same_loss_and_gradients(name):
    """lit.compile=true: configure_model() compiles the training loss; with the same random
    draws (inductor told to use eager's generator) it equals the eager loss, gradients included,
    and parameter names (so checkpoints) do not change."""
    model, batch = _model_and_batch(name)
    names = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = model.objective(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads()
    model.configure_model()
    assert "objective" in vars(model)  # compiled
    with inductor_config.patch(fallback_random=True):
        compiled = loss_and_grads()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == names


@pytest.mark.parametrize("name", ["vae", "ssvae"])
def test_bf16_mixed_precision_keeps_the_bounds_in_single_precision(name):
    """trainer.precision=bf16-mixed runs the layers in bfloat16; the networks hand their outputs
    on in float32, so a bound summed over pixels and z stays float32 and within a fraction of a
    nat of the float32 bound (a bfloat16 sum of ~-500 nats is only resolved to 2 nats)."""
    torch.manual_seed(0)
    model = (VAE((1, 28, 28), z_dim=8) if name == "vae" else M2((1, 28, 28), num_classes=10, z_dim=8)).eval()
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.3))
    torch.manual_seed(1)
    single = model.bound(x).elbo
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        mixed = model.bound(x).elbo
    assert mixed.dtype == torch.float32
    assert single.abs().min() > 100 and (mixed - single).abs().max() < 0.5
