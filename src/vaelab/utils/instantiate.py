"""Build callbacks and loggers from their config groups."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from vaelab.utils.wandb import resolve_wandb_mode, store_wandb_run_id, summarise_best, wandb_run_id

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


def _sweep_name() -> str | None:
    """The name of the multirun this job belongs to (its sweep directory), if any."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def _set_wandb_run(entry: DictConfig, resume_from: str | None) -> None:
    """One W&B run per run directory: a resumed run continues the W&B run of the directory (or
    of the checkpoint) it resumes from; the jobs of a multirun share a group."""
    with open_dict(entry):
        if not entry.get("id"):
            entry.id, exists = wandb_run_id(entry.save_dir, resume_from)
            if exists:
                entry.resume = "allow"
                log.info("W&B: continuing run %s", entry.id)
        if not entry.get("group"):
            entry.group = _sweep_name()
    if rank_zero_only.rank == 0:
        store_wandb_run_id(entry.save_dir, entry.id)


def instantiate_loggers(cfg: DictConfig | None, resume_from: str | None = None) -> list[Logger]:
    """Instantiate every logger. A W&B logger with ``mode: null`` gets its mode resolved; an
    online one starts its run now and, when the server cannot be reached, logs offline instead.
    ``resume_from``: the checkpoint the run resumes from, whose W&B run it continues."""
    if not cfg:
        return []
    loggers = []
    for entry in cfg.copy().values():
        if not entry or "_target_" not in entry:
            continue
        if not _is_wandb(entry):
            loggers.append(hydra.utils.instantiate(entry))
            continue
        _set_wandb_run(entry, resume_from)
        requested = entry.get("mode") or os.environ.get("WANDB_MODE")
        _set_wandb_mode(entry, resolve_wandb_mode(entry.get("mode")), "as configured" if requested else "no W&B credentials found")
        logger = hydra.utils.instantiate(entry)
        if entry.mode == "online":
            try:
                logger.experiment  # noqa: B018  (starts the run)
            except Exception as error:  # wandb raises CommError, UsageError, TimeoutError ...
                _set_wandb_mode(entry, "offline", f"the online run could not start: {type(error).__name__}: {error}")
                sys.modules["wandb"].teardown()  # its service still holds the run id of the failed start
                logger = hydra.utils.instantiate(entry)
        if entry.mode != "disabled":
            summarise_best(logger.experiment)
        loggers.append(logger)
    return loggers


def log_hyperparameters(cfg: DictConfig, model: pl.LightningModule, loggers: list[Logger]) -> None:
    """Send the resolved config and the model's parameter count to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["model/params"] = sum(p.numel() for p in model.parameters())
    for logger in loggers:
        logger.log_hyperparams(params)

