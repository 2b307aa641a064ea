"""All checkpoint reading: a checkpoint checked against the configured model, the model settings
and run config it was written with, and the weights of a pretrained part."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

log = logging.getLogger(__name__)

# command-line choices that replace a restored section: a config group chosen anew
SECTION_GROUPS = {"model": {"model", "net", "likelihood", "posterior", "experiment"}, "data": {"data", "experiment"}}


def read(path: str | Path, what: str = "ckpt_path") -> dict:
    """The checkpoint at ``path``, loaded on the CPU with ``weights_only`` (no code runs); one
    clear error naming ``what`` when it is missing, a directory or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}={path} is a directory; give a checkpoint file in it, e.g. {path}/checkpoints/last.ckpt.")
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["state_dict"]
    except Exception as error:
        raise ValueError(f"{what}={path} is not a readable Lightning checkpoint ({type(error).__name__}: {error}).") from None
    return checkpoint


def state_mismatch(saved: dict, expected: dict) -> str:
    """How the weights ``saved`` differ from a model's state dict ``expected``: its missing and
    unexpected keys and those of another shape, a few of each; empty when they fit."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    resized = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    return "; ".join(
        f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", resized))
        if keys
    )


def check_checkpoint(path: str, module: pl.LightningModule) -> None:
    """Raise one clear error when ``path`` is missing, unreadable, or holds weights of another
    model than ``module``'s (another ``model=`` choice or other layer sizes)."""
    details = state_mismatch(read(path)["state_dict"], module.state_dict())
    if details:
        raise ValueError(
            f"ckpt_path={path} does not fit the configured {module.hparams.get('model')} ({details}). Use the model "
            "and sizes it was trained with, e.g. the run's config.yaml: model=... model.z_dim=..."
        )


def apply_model_settings(cfg: DictConfig, path: str) -> dict:
    """Set in ``cfg.model`` the model settings that the run of checkpoint ``path`` chose before
    training (a stage's choices, kept in its hyperparameters), so that the model built from
    ``cfg`` fits the weights; return them, for the module's own checkpoints to keep. An
    unreadable checkpoint is left to ``check_checkpoint``."""
    try:
        settings = dict(read(path).get("hyper_parameters", {}).get("model_settings") or {})
    except (OSError, ValueError):
        return {}
    with open_dict(cfg):
        for key, value in settings.items():
            cfg.model[key] = value
    return settings


def load_part(path: str | Path, part: nn.Module, prefix: str, what: str) -> None:
    """Load into ``part`` the weights under ``prefix`` of the checkpoint at ``path`` (a pretrained
    part of a model, e.g. M1 of M1+M2 from a ``model=vae`` run's ``model.``); ``what`` names the
    setting that gave the path in errors."""
    state = read(path, what)["state_dict"]
    weights = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    details = state_mismatch(weights, part.state_dict())
    if details:
        raise ValueError(
            f"{what}={path} does not hold the {type(part).__name__} that the configuration describes ({details}): "
            "train it with the same settings, or leave the setting null to train it first."
        )
    part.load_state_dict(weights)


def restore_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with the ``model`` and ``data`` sections of the run that wrote ``cfg.ckpt_path``
    (``<run>/.hydra/config.yaml`` beside ``<run>/checkpoints/``), unresolved, so paths follow
    this machine's ``paths``. Command-line ``overrides`` still win: choosing a group anew
    (``model=...``, ``net=...``, ``data=...``) keeps the composed section, and a value
    (``data.eval_batch_size=...``) is applied on top of the restored one."""
    checkpoint = Path(cfg.ckpt_path)
    saved_path = checkpoint.parent.parent / ".hydra" / "config.yaml"
    if checkpoint.parent.name != "checkpoints" or not saved_path.is_file():
        log.warning("No run config found for %s; evaluating the configured model and data.", checkpoint)
        return cfg
    saved = OmegaConf.load(saved_path)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    restored = cfg.copy()
    for section, groups in SECTION_GROUPS.items():
        if section not in saved or groups & set(keys):
            continue
        with open_dict(restored):
            restored[section] = saved[section]
        for key in keys:
            if key.startswith(f"{section}."):
                OmegaConf.update(restored, key, OmegaConf.select(cfg, key), force_add=True)
    log.info("Restored model and data from %s", saved_path)
    return restored
