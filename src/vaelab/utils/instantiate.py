"""Build callbacks and loggers from their config groups."""

from __future__ import annotations

import logging
import os

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from vaelab.utils.wandb import resolve_wandb_mode

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"The {kind} config must be a mapping of name -> {{_target_: ...}}, got {cfg!r}.")
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry and "_target_" in entry]


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    return _instantiate_group(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger; a W&B logger with ``mode: null`` gets its mode resolved."""
    if not cfg:
        return []
    cfg = cfg.copy()
    for entry in cfg.values():
        if entry and entry.get("_target_", "").endswith("WandbLogger"):
            entry.mode = resolve_wandb_mode(entry.get("mode"))
            if entry.mode != "online":
                # W&B's process-wide settings (its telemetry among them) read the mode from
                # the environment, not from the run: without this they still try the server.
                os.environ["WANDB_MODE"] = entry.mode
            if entry.mode == "offline":
                log.info(
                    "W&B logs offline (no credentials found) to %s/wandb; upload later with "
                    "`wandb sync %s/wandb/offline-run-*`.",
                    entry.save_dir,
                    entry.save_dir,
                )
    return _instantiate_group(cfg, "logger")


def log_hyperparameters(cfg: DictConfig, model: pl.LightningModule, loggers: list[Logger]) -> None:
    """Send the resolved config and the model's parameter count to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["model/params"] = sum(p.numel() for p in model.parameters())
    for logger in loggers:
        logger.log_hyperparams(params)

