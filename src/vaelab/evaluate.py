"""Evaluation entry point: ``python evaluate.py ckpt_path=...`` tests a trained checkpoint."""

from __future__ import annotations

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from vaelab.train import finish_wandb
from vaelab.utils import CONFIG_DIR, apply_extras, check_checkpoint, instantiate_loggers, log_hyperparameters


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt_path`` into the configured model and run the test set."""
    if not cfg.get("ckpt_path"):
        raise ValueError("Give the checkpoint to evaluate: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt")
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    check_checkpoint(cfg.ckpt_path, model)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers)
    log_hyperparameters(cfg, model, loggers)
    try:
        trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        finish_wandb()
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
