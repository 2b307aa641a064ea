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


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    """Instantiate every entry of the callbacks group (a mapping of name -> {_target_: ...})."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if entry and "_target_" in entry]


def _is_wandb(entry: DictConfig) -> bool:
    return bool(entry) and entry.get("_target_", "").endswith("WandbLogger")


def _set_wandb_mode(entry: DictConfig, mode: str, reason: str) -> None:
    entry.mode = mode
    if mode != "online":
        # W&B's process-wide settings (its telemetry among them) read the mode from the
        # environment, not from the run: without this they still try the server.
        os.environ["WANDB_MODE"] = mode
    if mode == "offline":
        log.warning(
            "W&B logs offline (%s) to %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`.",
            reason, entry.save_dir, entry.save_dir,
        )


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger. A W&B logger with ``mode: null`` gets its mode resolved; an
    online one starts its run now and, when the server cannot be reached, logs offline instead."""
    if not cfg:
        return []
    loggers = []
    for entry in cfg.copy().values():
        if not entry or "_target_" not in entry:
            continue
        if not _is_wandb(entry):
            loggers.append(hydra.utils.instantiate(entry))
            continue
        requested = entry.get("mode") or os.environ.get("WANDB_MODE")
        _set_wandb_mode(entry, resolve_wandb_mode(entry.get("mode")), "as configured" if requested else "no W&B credentials found")
        logger = hydra.utils.instantiate(entry)
        if entry.mode == "online":
            try:
                logger.experiment  # noqa: B018  (starts the run)
            except Exception as error:  # wandb raises CommError, UsageError, TimeoutError ...
                _set_wandb_mode(entry, "offline", f"the online run could not start: {type(error).__name__}: {error}")
                logger = hydra.utils.instantiate(entry)
        loggers.append(logger)
    return loggers


def log_hyperparameters(cfg: DictConfig, model: pl.LightningModule, loggers: list[Logger]) -> None:
    """Send the resolved config and the model's parameter count to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["model/params"] = sum(p.numel() for p in model.parameters())
    for logger in loggers:
        logger.log_hyperparams(params)

