"""All checkpoint reading: a checkpoint checked against the configured model, the model settings
and run config it was written with, and the weights of a pretrained part."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

log = logging.getLogger(__name__)

# the classes a restored config may build unless restore_targets says otherwise
OWN_TARGETS = ("vaelab.",)
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


def newest_readable(directory: str | Path) -> Path | None:
    """The most recently written checkpoint in ``directory`` that loads, if any. Checkpoints are
    never written with weights known to be bad (``vaelab.callbacks.LastCheckpoint``), so this
    is the newest good state."""
    for path in sorted(Path(directory).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            read(path)
        except (OSError, ValueError):
            continue
        return path
    return None


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


def check_checkpoint(path: str, module: pl.LightningModule) -> dict:
    """Raise one clear error when ``path`` is missing, unreadable, or holds weights of another
    model than ``module``'s (another ``model=`` choice or other layer sizes); return the checkpoint."""
    checkpoint = read(path)
    details = state_mismatch(checkpoint["state_dict"], module.state_dict())
    if details:
        raise ValueError(
            f"ckpt_path={path} does not fit the configured {module.hparams.get('model')} ({details}). Use the model "
            "and sizes it was trained with, e.g. the run's config.yaml: model=... model.z_dim=..."
        )
    return checkpoint


def check_resumable(path: str, checkpoint: dict, module: pl.LightningModule) -> None:
    """Raise one clear error when ``checkpoint`` (read from ``path``) was written with an average
    of the weights (``lit.ema_decay``) and ``module`` keeps none: its ``state_dict`` holds the
    average, and a resume without one would train on from it instead of from the weights
    training stopped at."""
    decay = checkpoint.get("hyper_parameters", {}).get("ema_decay")
    if "current_model_state" in checkpoint and module.hparams.get("ema_decay") is None:
        raise ValueError(
            f"ckpt_path={path} holds an average of the weights (lit.ema_decay={decay}) beside the weights training stopped "
            f"at; resume with lit.ema_decay={decay} to go on training both."
        )


def saved_model_config(path: str) -> dict:
    """The resolved model config that the module of checkpoint ``path`` was built from (empty
    when it cannot be read: that is left to ``check_checkpoint``)."""
    try:
        return dict(read(path).get("hyper_parameters", {}).get("model_config") or {})
    except (OSError, ValueError):
        return {}


def complete_model_config(cfg: DictConfig, path: str) -> dict:
    """Set in ``cfg.model`` the settings it leaves open (null) that the run of checkpoint ``path``
    settled before training (a stage's choices, e.g. M1+M2's ``features``), so that the model
    built from ``cfg`` fits the weights; return the checkpoint's model config. Its ``_target_``s
    are checked as a restored config's are (``restore_targets``)."""
    saved = saved_model_config(path)
    check_targets(saved, cfg.get("restore_targets") or OWN_TARGETS, f"the model config in {path}", "model")
    with open_dict(cfg):
        for key, value in saved.items():
            if key in cfg.model and cfg.model[key] is None and value is not None:
                cfg.model[key] = value
    return saved


def resume_model_config(cfg: DictConfig, path: str) -> None:
    """``complete_model_config``, then refuse to resume with model settings other than the
    checkpoint's (say, another activation: every tensor keeps its shape, but another network
    would train) unless ``allow_model_change`` is set."""
    saved = complete_model_config(cfg, path)
    configured = OmegaConf.to_container(cfg.model, resolve=True)
    changes = [f"model.{key}={configured.get(key)} (checkpoint: {saved.get(key)})"
               for key in sorted(set(saved) | set(configured)) if saved and configured.get(key) != saved.get(key)]
    if changes and not cfg.get("allow_model_change"):
        raise ValueError(
            f"ckpt_path={path} was trained with other model settings: {'; '.join(changes)}. Resume with the checkpoint's "
            "settings (drop these overrides), or set allow_model_change=true to train the changed model from its weights."
        )
    if changes:
        log.warning("Resuming with changed model settings (allow_model_change=true): %s", "; ".join(changes))


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


def check_targets(node: Any, allowed: Sequence[str], source: str, key: str = "", option: str | None = "restore_targets") -> None:
    """Refuse a ``_target_`` in ``node`` (restored from ``source``) outside the ``allowed``
    prefixes: a config restored from a run directory or checkpoint is data, and building it must
    not run code that the project does not ship or the user did not allow. ``option``: the
    setting that allows more (None where the caller has none)."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(tuple(allowed)):
            raise ValueError(
                f"{source} asks to build {target!r} (at {key or 'its top'}), which is not one of vaelab's own classes; "
                f"refused without running it. "
                + (f"If you trust that run, allow it: {option}='[{', '.join([*allowed, str(target)])}]'." if option else
                   "This script builds vaelab's own classes only.")
            )
        for name, value in node.items():
            check_targets(value, allowed, source, f"{key}.{name}" if key else str(name), option)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_targets(value, allowed, source, f"{key}[{index}]", option)


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
        check_targets(saved[section], cfg.get("restore_targets") or OWN_TARGETS, str(saved_path), section)
        with open_dict(restored):
            restored[section] = saved[section]
        for key in keys:
            if key.startswith(f"{section}."):
                OmegaConf.update(restored, key, OmegaConf.select(cfg, key), force_add=True)
    log.info("Restored model and data from %s", saved_path)
    return restored
