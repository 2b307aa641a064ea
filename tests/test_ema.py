"""lit.ema_decay: validation, checkpoints and test see an exponential moving average of the
weights; training goes on with the weights themselves."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch

from vaelab.callbacks import LastCheckpoint
from vaelab.train import build, train
from vaelab.training import WeightEMA
from vaelab.training.ema import ema_decay
from conftest import compose_config


def test_the_decay_warms_up_to_the_configured_one():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay(0.999, 10**6) == 0.999


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, 1])
def test_a_decay_outside_zero_to_one_is_refused_naming_the_setting(decay):
    with pytest.raises(ValueError, match=r"lit\.ema_decay must lie strictly between 0 and 1"):
        WeightEMA(decay)


class Recorder(pl.Callback):
    """The module's weights before training, after every training step and at the start of validation."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.after_steps: list[dict[str, torch.Tensor]] = []
        self.in_validation: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in module.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.initial = self.weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_steps.append(self.weights(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            self.in_validation.append(self.weights(pl_module))


def test_validation_and_checkpoints_use_the_average_and_training_the_weights(quick_overrides, tmp_path):
    cfg = compose_config("train", [*quick_overrides, "model=sdgm", "data.labeled=100", "data.labeled_batch_size=20",
                                   "data.batch_size=32", "lit.ema_decay=0.9", "trainer.precision=32-true"])
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=6, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        callbacks=[recorder, LastCheckpoint(str(tmp_path / "checkpoints"))],
    )
    trainer.fit(module, datamodule=datamodule)

    # the average by hand: the initial weights, then after step t a lerp to the weights with
    # weight 1 - d_t (batch-norm statistics too; its step counter is copied)
    average = dict(recorder.initial)
    for step, weights in enumerate(recorder.after_steps, start=1):
        for name, value in weights.items():
            average[name] = torch.lerp(average[name], value, 1 - ema_decay(0.9, step)) if value.is_floating_point() else value
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    final = recorder.after_steps[-1]
    assert any("running_mean" in name for name in average)  # the SDGM's batch norm
    for name, value in average.items():
        torch.testing.assert_close(saved["state_dict"][name], value, msg=name)
        torch.testing.assert_close(recorder.in_validation[0][name], value, msg=name)
        assert torch.equal(saved["current_model_state"][name], final[name]), name
    assert any(not torch.allclose(average[name], final[name]) for name in average)
    # after training the module holds the average: trainer.test and sampling use it
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, average[name], msg=name)


def test_resuming_an_averaged_run_without_the_average_is_refused_with_the_fix(quick_overrides, tmp_path):
    short = ["model=vae", "test=false", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.batch_size=32"]
    train(compose_config("train", [*quick_overrides, *short, "trainer.max_epochs=1", "lit.ema_decay=0.9"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = compose_config("train", [*quick_overrides, *short, "trainer.max_epochs=2", f"ckpt_path={last}",
                                       f"paths.output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(ValueError, match=r"holds an average of the weights \(lit\.ema_decay=0\.9\).*resume with lit\.ema_decay=0\.9"):
        train(resumed)


def test_half_precision_weights_are_refused_before_training_naming_the_fix(quick_overrides, tmp_path):
    """In bfloat16 an update of 0.001 of the difference rounds away: the average would stay frozen."""
    cfg = compose_config("train", [*quick_overrides, "model=vae", "test=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                   "trainer.limit_val_batches=1", "data.batch_size=32", "lit.ema_decay=0.999", "trainer.precision=bf16-true"])
    with pytest.raises(ValueError, match=r"trainer\.precision=bf16-true holds them in bfloat16.*Use trainer\.precision=bf16-mixed"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))
