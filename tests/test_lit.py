"""The one LightningModule: manual stepping with clipping and accumulation, the finiteness guard
without a per-step read on accelerators, the model interface's boundaries, and training by any
objective (a new one needs no change to LitModel)."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch.distributions import Independent, Normal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from vaelab.lit import LitModel
from vaelab.models import M2, VAE
from vaelab.objectives import ELBO, DataFacts, Objective
from vaelab.train import train
from vaelab.training import FinitenessGuard, budget_spent
from conftest import compose_config

MODELS_DIR = Path(__file__).resolve().parents[1] / "src" / "vaelab" / "models"
NET = {"type": "mlp", "hidden": [16]}


def test_models_know_nothing_of_lightning_data_modules_or_objectives():
    for path in MODELS_DIR.glob("*.py"):
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        forbidden = ("lightning", "vaelab.data", "vaelab.lit", "vaelab.objectives", "vaelab.training")
        assert not [line for line in imports if any(name in line for name in forbidden)], path.name
        assert "datamodule" not in path.read_text(), path.name


def batches(n: int, size: int = 8) -> DataLoader:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((n * size, 1, 6, 6), 0.3))
    return DataLoader(TensorDataset(x, torch.zeros(n * size, dtype=torch.long)), batch_size=size)


def vae_module(**options) -> LitModel:
    """A tiny VAE trained by the ELBO."""
    return LitModel(VAE((1, 6, 6), z_dim=2, net=NET), objective=ELBO(), **options)


def fit(module: LitModel, n_batches: int, **trainer_options) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **trainer_options,
    )
    trainer.fit(module, train_dataloaders=batches(n_batches))
    return trainer


def float16_with_a_loss_scaler(init_scale: float) -> dict:
    """Trainer options for float16 mixed precision with its loss scaler (Lightning gives a CPU
    bf16 instead of float16, so the plugin is built here as on a CUDA device)."""
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))]}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_gradients_are_clipped_to_the_configured_total_norm(precision, fused):
    """Also for a fused optimizer under mixed precision, which unscales inside its own step
    (the default lit.optimizer with model=ssvae's clipping wherever bf16 is native)."""
    torch.manual_seed(0)
    sgd = lambda params: torch.optim.SGD(params, lr=1.0, fused=fused)  # noqa: E731  (the update is the clipped gradient)
    module = vae_module(optimizer=sgd, gradient_clip_val=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    fit(module, 1, **(float16_with_a_loss_scaler(1024.0) if precision == "16-mixed" else {"precision": precision}))
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)


def test_under_a_loss_scaler_an_overflowing_step_is_skipped_by_the_scaler_and_training_goes_on():
    module = vae_module(optimizer=lambda p: torch.optim.Adam(p, fused=True), gradient_clip_val=5.0)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, 2, **float16_with_a_loss_scaler(3e38))  # the scaled loss overflows float32
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == pytest.approx(3e38 * 0.5**2)  # both steps skipped, the scale halved twice
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_gradients_accumulate_over_the_configured_number_of_batches():
    module = vae_module(optimizer=lambda p: torch.optim.Adam(p), accumulate_grad_batches=2)
    assert fit(module, 6).global_step == 3
    module = vae_module(optimizer=lambda p: torch.optim.Adam(p), accumulate_grad_batches=4)
    assert fit(module, 6).global_step == 2  # the last, partial group steps too


class LearningRates(pl.Callback):
    """The learning rate and share of the budget spent at every optimizer step."""

    def __init__(self) -> None:
        self.lrs, self.spent = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.spent.append(budget_spent(trainer, pl_module.global_step))


def test_the_cosine_schedule_starts_at_the_configured_lr_and_anneals_to_zero_over_the_steps():
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    fit(vae_module(optimizer=sgd, lr_schedule="cosine"), 8, callbacks=[seen])
    assert seen.lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert seen.lrs[0] == 0.1 and seen.lrs[4] == pytest.approx(0.05)
    seen = LearningRates()
    fit(vae_module(optimizer=sgd), 8, callbacks=[seen])
    assert seen.lrs == [0.1] * 8


def test_the_step_schedule_decays_every_few_epochs_down_to_its_floor():
    """lit.lr_schedule=step: lr x factor every ``epochs`` epochs, never below ``lowest`` x lr."""
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    module = vae_module(optimizer=sgd, lr_schedule="step", lr_step={"epochs": 2, "factor": 0.5, "lowest": 0.3})
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[seen])
    trainer.fit(module, train_dataloaders=batches(1))
    assert seen.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.03, 0.03])


def test_the_tail_schedule_keeps_the_lr_then_anneals_it_to_zero_over_the_last_share_of_the_budget():
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    fit(vae_module(optimizer=sgd, lr_schedule="tail", lr_tail=0.5), 10, callbacks=[seen])
    assert seen.lrs == pytest.approx([0.1] * 6 + [0.08, 0.06, 0.04, 0.02])  # at step k of 10: (1 - k/10) / 0.5, at most 1


def test_with_a_time_limit_the_schedule_follows_whichever_budget_is_further_spent(monkeypatch):
    from pytorch_lightning.callbacks import Timer

    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": 30.0)
    monkeypatch.setattr(Timer, "time_remaining", lambda self, stage="train": 90.0)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    seen = LearningRates()
    fit(vae_module(optimizer=sgd, lr_schedule="cosine"), 8, max_time={"hours": 1}, callbacks=[seen])
    # 30 of 120 s spent (the timer) is further than k of 8 steps until step 2, then the steps lead
    assert seen.spent == pytest.approx([0.25, 0.25, 0.25, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8])
    assert seen.lrs[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_a_non_finite_gradient_of_a_finite_loss_stops_training_before_its_update(monkeypatch):
    module = vae_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    original = module.loss

    def loss(batch):  # sqrt(|0 w|) is 0, its gradient is not finite
        value, metrics = original(batch)
        return value + (module.model.encoder.head[0].weight[0, 0] * 0).abs().sqrt(), metrics

    monkeypatch.setattr(module, "loss", loss)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 0 \(epoch 0\) of a finite loss, in encoder.head.0.weight"):
        fit(module, 2)
    assert all(torch.equal(b, p) for b, p in zip(before, module.parameters()))


@pytest.mark.parametrize("where", ["cpu", "accelerator"])
def test_the_guard_checks_the_gradients_the_optimizer_applies_and_an_overflowing_total_alone_passes(monkeypatch, where):
    """Finite gradients whose total overflows (3e38 + 3e38) pass; an inf among them is named; a
    parameter outside the optimizer is not the guard's to check."""
    if where == "accelerator":
        on_an_accelerator(monkeypatch)
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(module[0].parameters(), lr=0.1)
    guard = FinitenessGuard()
    module[0].weight.grad = torch.full((2, 2), 3e38)
    module[0].bias.grad = torch.full((2,), -3e38)
    module[1].weight.grad = torch.full((2, 2), math.nan)  # not stepped by this optimizer
    guard.check_gradients(module, optimizer, 0, 0)
    guard.raise_if_bad({}, 0)
    module[0].bias.grad[1] = -math.inf
    if where == "cpu":
        with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 3 \(epoch 1\) of a finite loss, in 0.bias\."):
            guard.check_gradients(module, optimizer, 3, 1)
    else:
        guard.check_gradients(module, optimizer, 3, 1)
        assert torch.equal(module[0].bias.grad, torch.zeros(2))  # this update is skipped
        with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 3 \(epoch 1\)"):
            guard.raise_if_bad({}, 1)


def test_the_progress_bar_shows_the_training_bound():
    module = vae_module(optimizer=lambda p: torch.optim.Adam(p))
    trainer = fit(module, 2, log_every_n_steps=1)
    assert set(trainer.progress_bar_metrics) == {"train/elbo"}
    cvae = LitModel(VAE((1, 6, 6), z_dim=2, num_classes=3, net=NET), objective=ELBO(), optimizer=lambda p: torch.optim.Adam(p))
    assert set(fit(cvae, 2, log_every_n_steps=1).progress_bar_metrics) == {"train/elbo_given_y"}


def test_trainer_level_clipping_is_refused_with_the_option_to_use(quick_overrides):
    with pytest.raises(ValueError, match="set lit.gradient_clip_val and lit.accumulate_grad_batches instead"):
        train(compose_config("train", [*quick_overrides, "debug=fdr", "+trainer.gradient_clip_val=1.0"]))


@pytest.mark.parametrize("options, message", [
    ({"iwae_k": -1}, "eval.iwae_k must be a non-negative integer, got -1"),
    ({"gradient_clip_val": 0}, "lit.gradient_clip_val must be positive or null"),
    ({"accumulate_grad_batches": 0}, "lit.accumulate_grad_batches must be a positive integer"),
    ({"lr_schedule": "linear"}, "lit.lr_schedule='linear' must be one of constant, cosine, step, tail"),
    ({"lr_schedule": "tail", "lr_tail": 0}, "lit.lr_tail must be the share of the budget"),
    ({"lr_step": {"epochs": 0, "factor": 0.5, "lowest": 0.1}}, r"lit.lr_step must be \{epochs: a positive integer"),
    ({"optimizer": lambda p: torch.optim.Adam(p, lr=-1.0)}, "lit.optimizer: Invalid learning rate"),
])
def test_impossible_settings_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        vae_module(**options)


def test_a_module_without_an_objective_evaluates_but_refuses_to_train():
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), optimizer=lambda p: torch.optim.Adam(p))
    assert module.trained_bound == "elbo"  # the model's own bound: what evaluation logs
    with pytest.raises(RuntimeError, match="LitModel was built without an objective"):
        fit(module, 1)


def on_an_accelerator(monkeypatch) -> None:
    """Make the guard behave as where reading the loss would wait for the device."""
    monkeypatch.setattr(FinitenessGuard, "reads_every_step", staticmethod(lambda tensor: False))


def test_on_an_accelerator_a_bad_step_is_skipped_and_the_run_stops_when_it_next_logs(monkeypatch):
    """Where reading the loss would wait for the device, the guard records the first bad step on
    the device, skips that step's update and stops at the next step that logs."""
    on_an_accelerator(monkeypatch)
    bound, calls = VAE.bound, {"n": 0}

    def failing_bound(self, x, y=None, qy_logits=None):
        terms = bound(self, x, y)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2
            terms.elbo = terms.elbo * math.nan
        return terms

    monkeypatch.setattr(VAE, "bound", failing_bound)
    module = vae_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 2 \(epoch 0\)"):
        fit(module, 10, log_every_n_steps=5)
    assert calls["n"] == 5  # it stopped at step 4, the first that logs
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_on_an_accelerator_a_non_finite_gradient_of_a_finite_loss_is_skipped_and_named_when_the_run_next_logs(monkeypatch):
    on_an_accelerator(monkeypatch)
    module = vae_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    original, calls = module.loss, {"n": 0}

    def loss(batch):  # at step 2, sqrt(|0 w|): 0 added to the loss, a non-finite gradient
        value, metrics = original(batch)
        calls["n"] += 1
        if calls["n"] == 3:
            value = value + (module.model.encoder.head[0].weight[0, 0] * 0).abs().sqrt()
        return value, metrics

    monkeypatch.setattr(module, "loss", loss)
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient at step 2 \(epoch 0\) of a finite loss\. Training stopped"):
        fit(module, 10, log_every_n_steps=5)
    assert calls["n"] == 5  # it stopped at step 4, the first that logs
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -- a new objective needs no change to LitModel -------------------------------------------
class PosteriorMeanBeta(Objective):
    """A deterministic beta-VAE objective written outside vaelab: the reconstruction at q(z|x)'s
    mean minus beta times the closed-form KL. It keeps the base class's ``check``."""

    name = "beta_at_mean"

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self._steps: list[int] = []

    def bound(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        qz = model.encode(x)
        prior = Independent(Normal(torch.zeros_like(qz.mean), torch.ones_like(qz.mean)), 1)
        return model.decode(qz.mean).log_prob(x) - self.beta * kl_divergence(qz, prior)

    def __call__(self, model, batch, step):
        self._steps.append(step)
        bound = self.bound(model, batch[0])
        return -bound.mean(), {"beta_bound": bound.mean()}

    def trained_bound(self, model) -> str:
        return "beta_bound"

    def validation_terms(self, model, x, y):
        return {"beta_bound": self.bound(model, x)}


def test_a_new_objective_trains_through_lit_model_unchanged():
    torch.manual_seed(0)
    objective = PosteriorMeanBeta(beta=4.0)
    module = LitModel(VAE((1, 6, 6), z_dim=2, net=NET), objective=objective, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert module.trained_bound == "beta_bound"  # validation logs it; by default it picks the best checkpoint
    assert module.hparams["objective"] == {"name": "beta_at_mean", "beta": 4.0}

    # the first update is exactly one SGD step down the objective's own gradient
    x = next(iter(batches(3)))[0]
    reference = copy.deepcopy(module.model)
    (-objective.bound(reference, x).mean()).backward()
    expected = {name: p.detach() - 0.1 * p.grad for name, p in reference.named_parameters()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=batches(3))
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)

    # it trains on, is told the optimizer step, and validation measures its bound beside the model's
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=batches(3), val_dataloaders=batches(2))
    assert objective._steps == [0, 0, 1, 2]
    val_x = torch.cat([b[0] for b in batches(2)])
    with torch.no_grad():
        assert float(trainer.callback_metrics["val/beta_bound"]) == pytest.approx(float(objective.bound(module.model, val_x).mean()), rel=1e-5)
    assert "val/elbo" in trainer.callback_metrics


def test_a_new_objective_inherits_the_check_for_plain_batches():
    with pytest.raises(ValueError, match="objective=beta_at_mean trains models without a classifier; M2"):
        LitModel(M2((1, 6, 6), num_classes=3, z_dim=2, net=NET), objective=PosteriorMeanBeta(1.0))
    with pytest.raises(ValueError, match=r"VAE trains on plain batches, but data.labeled=100"):
        LitModel(VAE((1, 6, 6), z_dim=2, net=NET), objective=PosteriorMeanBeta(1.0), data=DataFacts(labeled=100, train_size=1000))


def test_compile_mode_reaches_torch_compile_and_an_unknown_one_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="lit.compile_mode='fast' is not one of torch.compile's modes: None, default, reduce-overhead"):
        LitModel(VAE((1, 4, 4), z_dim=2), objective=ELBO(), compile=True, compile_mode="fast")
    modes = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or real(fn, mode=mode))
    module = LitModel(VAE((1, 4, 4), z_dim=2), objective=ELBO(), compile=True, compile_mode="max-autotune-no-cudagraphs")
    module.configure_model()
    assert modes == ["max-autotune-no-cudagraphs"]


def test_an_optimizer_without_a_fused_kernel_is_told_to_drop_it():
    with pytest.raises(ValueError, match=r"lit.optimizer: .*'fused' \(set lit.optimizer.fused=null"):
        LitModel(VAE((1, 4, 4), z_dim=2), objective=ELBO(), optimizer=functools.partial(torch.optim.RMSprop, lr=1e-3, fused=True))
