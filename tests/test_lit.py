"""The one LightningModule: manual stepping with clipping and accumulation, the finiteness guard
without a per-step read on accelerators, the model interface's boundaries, old checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.train import train
from vaelab.utils import restore_run_config
from vaelab.utils.checkpoint import upgrade_state_dict
from conftest import compose_config

MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "vaelab" / "models"
NET = {"type": "mlp", "hidden": [16]}


def test_models_know_nothing_of_lightning_or_data_modules():
    for path in MODELS_DIR.glob("*.py"):
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if "lightning" in line or "vaelab.data" in line or "vaelab.lit" in line], path.name
        assert "datamodule" not in path.read_text(), path.name


def batches(n: int, size: int = 8) -> DataLoader:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((n * size, 1, 6, 6), 0.3))
    return DataLoader(TensorDataset(x, torch.zeros(n * size, dtype=torch.long)), batch_size=size)


def fit(module: LitModel, n_batches: int, **trainer_options) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **trainer_options,
    )
    trainer.fit(module, train_dataloaders=batches(n_batches))
    return trainer


def test_gradients_are_clipped_to_the_configured_total_norm():
    torch.manual_seed(0)
    sgd = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731  (the update is the clipped gradient)
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=sgd, gradient_clip_val=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    fit(module, 1)
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)


def test_gradients_accumulate_over_the_configured_number_of_batches():
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.Adam(p), accumulate_grad_batches=2)
    assert fit(module, 6).global_step == 3
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.Adam(p), accumulate_grad_batches=4)
    assert fit(module, 6).global_step == 2  # the last, partial group steps too


class LearningRates(pl.Callback):
    """The learning rate and share of the budget spent at every optimizer step."""

    def __init__(self) -> None:
        self.lrs, self.spent = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.spent.append(pl_module.budget_spent())


def test_the_cosine_schedule_starts_at_the_configured_lr_and_anneals_to_zero_over_the_steps():
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    fit(LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=sgd, lr_schedule="cosine"), 8, callbacks=[seen])
    assert seen.lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert seen.lrs[0] == 0.1 and seen.lrs[4] == pytest.approx(0.05)
    seen = LearningRates()
    fit(LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=sgd), 8, callbacks=[seen])
    assert seen.lrs == [0.1] * 8


def test_the_step_schedule_decays_every_few_epochs_down_to_its_floor():
    """lit.lr_schedule=step: lr x factor every ``epochs`` epochs, never below ``lowest`` x lr."""
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=sgd, lr_schedule="step", lr_step={"epochs": 2, "factor": 0.5, "lowest": 0.3})
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[seen])
    trainer.fit(module, train_dataloaders=batches(1))
    assert seen.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.03, 0.03])


def test_with_a_time_limit_the_schedule_follows_whichever_budget_is_further_spent(monkeypatch):
    from pytorch_lightning.callbacks import Timer

    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": 30.0)
    monkeypatch.setattr(Timer, "time_remaining", lambda self, stage="train": 90.0)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    fit(LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=sgd, lr_schedule="cosine"), 8,
        max_time={"hours": 1}, callbacks=[seen])
    # 30 of 120 s spent (the timer) is further than k of 8 steps until step 2, then the steps lead
    assert seen.spent == pytest.approx([0.25, 0.25, 0.25, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8])
    assert seen.lrs[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_a_non_finite_gradient_of_a_finite_loss_stops_training_before_its_update(monkeypatch):
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    original = module.objective

    def objective(batch):  # sqrt(|0 w|) is 0, its gradient is not finite
        loss, metrics = original(batch)
        return loss + (module.model.encoder.head[0].weight[0, 0] * 0).abs().sqrt(), metrics

    monkeypatch.setattr(module, "objective", objective)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 0 \(epoch 0\) of a finite loss, in encoder.head.0.weight"):
        fit(module, 2)
    assert all(torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_the_progress_bar_shows_the_training_bound():
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.Adam(p))
    trainer = fit(module, 2, log_every_n_steps=1)
    assert set(trainer.progress_bar_metrics) == {"train/elbo"}


def test_trainer_level_clipping_is_refused_with_the_option_to_use(quick_overrides):
    with pytest.raises(ValueError, match="set lit.gradient_clip_val and lit.accumulate_grad_batches instead"):
        train(compose_config("train", [*quick_overrides, "debug=fdr", "+trainer.gradient_clip_val=1.0"]))


@pytest.mark.parametrize("options, message", [
    ({"iwae_k": -1}, "eval.iwae_k must be a non-negative integer, got -1"),
    ({"gradient_clip_val": 0}, "lit.gradient_clip_val must be positive or null"),
    ({"accumulate_grad_batches": 0}, "lit.accumulate_grad_batches must be a positive integer"),
    ({"alpha": -1.0}, "lit.alpha must be >= 0"),
    ({"class_balance": -1.0}, "lit.class_balance must be >= 0"),
    ({"lr_schedule": "linear"}, "lit.lr_schedule='linear' must be one of constant, cosine, step"),
    ({"lr_step": {"epochs": 0, "factor": 0.5, "lowest": 0.1}}, r"lit.lr_step must be \{epochs: a positive integer"),
])
def test_impossible_settings_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        LitModel(VAE((1, 6, 6), z_dim=2, net=NET), **options)


def test_on_an_accelerator_a_bad_step_is_skipped_and_the_run_stops_when_it_next_logs(monkeypatch):
    """Where reading the loss would wait for the device, the guard records the first bad step on
    the device, skips that step's update and stops at the next step that logs."""
    monkeypatch.setattr(LitModel, "reads_loss_every_step", lambda self, loss: False)
    bound, calls = VAE.bound, {"n": 0}

    def failing_bound(self, x, y=None):
        terms = bound(self, x, y)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2
            terms.elbo = terms.elbo * math.nan
        return terms

    monkeypatch.setattr(VAE, "bound", failing_bound)
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 2 \(epoch 0\)"):
        fit(module, 10, log_every_n_steps=5)
    assert calls["n"] == 5  # it stopped at step 4, the first that logs
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_on_an_accelerator_a_non_finite_gradient_of_a_finite_loss_is_skipped_and_named_when_the_run_next_logs(monkeypatch):
    monkeypatch.setattr(LitModel, "reads_loss_every_step", lambda self, loss: False)
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    original, calls = module.objective, {"n": 0}

    def objective(batch):  # at step 2, sqrt(|0 w|): 0 added to the loss, a non-finite gradient
        loss, metrics = original(batch)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss + (module.model.encoder.head[0].weight[0, 0] * 0).abs().sqrt()
        return loss, metrics

    monkeypatch.setattr(module, "objective", objective)
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 2 \(epoch 0\) of a finite loss\. Training stopped"):
        fit(module, 10, log_every_n_steps=5)
    assert calls["n"] == 5  # it stopped at step 4, the first that logs
    assert all(torch.isfinite(p).all() for p in module.parameters())


def legacy(state_dict: dict) -> dict:
    """A state dict as it was written when the LightningModule was the model itself."""
    return {key.removeprefix("model.").removeprefix("vae."): value for key, value in state_dict.items()}


def test_checkpoints_and_run_configs_written_before_the_model_interface_load(quick_overrides, tmp_path):
    torch.manual_seed(0)
    module = LitModel(M2((1, 28, 28), num_classes=10, z_dim=4, net=NET))
    old = legacy(module.state_dict())
    assert "encoder.head.input.weight" in old and "classifier.head.0.weight" in old
    fresh = LitModel(M2((1, 28, 28), num_classes=10, z_dim=4, net=NET))
    checkpoint = {"state_dict": old}
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(fresh.state_dict(), module.state_dict())
    current = module.state_dict()
    assert upgrade_state_dict(current, current) is current  # today's keys are left alone

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = compose_config("train", [*quick_overrides, "model=ssvae", "model.z_dim=4"])
    saved.model = OmegaConf.create({
        "_target_": "vaelab.models.SSVAE", "input_shape": [1, 28, 28], "num_classes": 10, "z_dim": 4,
        "net": {"type": "mlp", "hidden": [16]}, "likelihood": {"type": "bernoulli"}, "alpha": None,
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-4}, "compile": False,
    })
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    cfg = restore_run_config(compose_config("evaluate", [*quick_overrides, f"ckpt_path={run}/checkpoints/last.ckpt"]), [])
    assert cfg.model._target_ == "vaelab.models.M2" and cfg.model.z_dim == 4 and "optimizer" not in cfg.model
