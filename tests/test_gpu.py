"""The GPU path: a training step never makes the host wait for the device (runs where CUDA exists)."""

from __future__ import annotations

from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader

from conftest import compose_config
from vaelab.train import build, train
from vaelab.training import WeightEMA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class NoSyncSteps(pl.Callback):
    """From step ``after`` on, any host-device synchronisation inside a training step raises."""

    def __init__(self, after: int) -> None:
        self.after, self.checked = after, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.after:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.checked += 1


@pytest.mark.parametrize("model", [["model=vae"], ["model=ssvae", "data.labeled=100"]], ids=["vae", "ssvae"])
def test_training_steps_and_batches_on_the_gpu_never_wait_for_it(model, mnist_dir, tmp_path):
    cfg = compose_config("train", [*model, "trainer=gpu", "data.on_device=true", f"paths.data_dir={mnist_dir}",
                                   f"paths.output_dir={tmp_path}", "lit.gradient_clip_val=5"])
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    check = NoSyncSteps(after=3)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision=cfg.trainer.precision, max_steps=12,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         log_every_n_steps=50, callbacks=[check])
    try:
        trainer.fit(module, datamodule=datamodule)
        assert check.checked == 9
        # gathering a batch on the device does not wait for it either
        loader = datamodule.train_dataloader()
        torch.cuda.set_sync_debug_mode("error")
        for _, batch in zip(range(3), loader):
            if isinstance(loader, CombinedLoader):  # it yields (batch, batch_idx, dataloader_idx)
                batch = batch[0]
            datamodule.preprocess_batch(batch, train=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_average_of_the_weights_moves_to_the_gpu_and_updates_without_waiting_for_it():
    net = pl.LightningModule()
    net.layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(0.999)
    ema.setup(None, net, "fit")  # the copy is taken on the CPU, before the module reaches its device
    net.cuda()
    ema.on_fit_start(None, net)
    average = ema._average_model.module.layers
    assert all(p.is_cuda for p in average.parameters()) and average[1].running_mean.is_cuda
    with torch.no_grad():
        net.layers[0].weight.add_(1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.on_train_batch_end(SimpleNamespace(global_step=1), net, None, None, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(average[0].weight, net.layers[0].weight - 1.0 + 9 / 11)  # d_1 = 2/11


def test_a_gpu_run_resumes_with_the_fused_update_from_a_checkpoint_without_it(mnist_dir, tmp_path):
    """The fused Adam keeps its step count on the GPU; a checkpoint of the unfused one kept it on the CPU."""
    common = ["model=vae", "trainer=gpu", f"paths.data_dir={mnist_dir}", "trainer.limit_train_batches=3",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "test=false", "logger=csv"]
    first = compose_config("train", [*common, f"paths.output_dir={tmp_path}", "lit.optimizer.fused=null", "trainer.max_epochs=1"])
    train(first)
    resumed = compose_config("train", [*common, f"paths.output_dir={tmp_path}", "trainer.max_epochs=2",
                                       f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    train(resumed)
    assert (tmp_path / "checkpoints" / "epoch_001.ckpt").is_file()
