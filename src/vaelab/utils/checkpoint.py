"""Checkpoints: check that one exists, is one, and fits the configured model; restore the
config of the run that wrote it."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# command-line choices that replace a restored section: a config group chosen anew
SECTION_GROUPS = {"model": {"model", "net", "likelihood", "posterior", "experiment"}, "data": {"data", "experiment"}}


# models of checkpoints written before vaelab.lit.LitModel held the model: (class, config choice)
LEGACY_MODELS = {"vaelab.models.VAE": ("vaelab.models.VAE", False), "vaelab.models.CVAE": ("vaelab.models.VAE", True),
                 "vaelab.models.SSVAE": ("vaelab.models.M2", True)}


def upgrade_state_dict(saved: dict, expected: Iterable[str]) -> dict:
    """A state dict written when the LightningModule was the model itself (keys ``encoder...``,
    ``classifier...``) with the keys of today's ``LitModel`` (``model.encoder...``, and for M2
    ``model.vae.encoder...``, ``model.classifier...``); other state dicts are returned as they are."""
    if any(key.startswith("model.") for key in saved):
        return saved
    expected = set(expected)
    renamed = {}
    for key, value in saved.items():
        candidates = [name for name in (f"model.{key}", f"model.vae.{key}") if name in expected]
        renamed[candidates[0] if candidates else key] = value
    return renamed


def upgrade_run_config(saved: DictConfig) -> DictConfig:
    """A run config written before the training settings moved from ``model`` to ``lit``: the
    model section rewritten for today's classes (the old optimizer, alpha and compile settings,
    which evaluation does not use, are dropped)."""
    model = saved.get("model")
    if model is None or model.get("_target_") not in LEGACY_MODELS or "optimizer" not in model:
        return saved
    target, conditional = LEGACY_MODELS[model._target_]
    keep = {key: model[key] for key in ("input_shape", "z_dim", "net", "likelihood") if key in model}
    saved.model = OmegaConf.create({"_target_": target, "_convert_": "all", **keep,
                                    "num_classes": model.num_classes if conditional else None})
    log.info("Converted the run config's model section from %s to %s.", model._target_, target)
    return saved


def settings_from_checkpoint(cfg: DictConfig, path: str) -> None:
    """Model settings that a run chose from its data and keeps in its checkpoint, set in
    ``cfg.model`` where the config leaves them open (M1+M2's ``model.features=null``: the number
    of dimensions of z1 that M2 reads), so the model built from ``cfg`` fits the weights. An
    unreadable checkpoint is left to ``check_checkpoint``."""
    if "features" not in cfg.model or cfg.model.features is not None:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception:
        return
    if "model.kept" in state:
        with open_dict(cfg):
            cfg.model.features = len(state["model.kept"])


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


def check_checkpoint(path: str, model: pl.LightningModule) -> None:
    """Raise one clear error when ``path`` is missing, unreadable, or holds weights of another
    model than ``model`` (another ``model=`` choice or other layer sizes); checkpoints written
    before the model moved inside ``LitModel`` are read with their keys renamed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["state_dict"]
    except Exception as error:
        raise ValueError(f"ckpt_path={path} is not a readable Lightning checkpoint ({type(error).__name__}: {error}).") from None
    expected = model.state_dict()
    details = state_mismatch(upgrade_state_dict(saved, expected), expected)
    if details:
        raise ValueError(
            f"ckpt_path={path} does not fit model={model.hparams.get('model')} ({details}). Use the model "
            "and sizes it was trained with, e.g. the run's config.yaml: model=... model.z_dim=..."
        )


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
    saved = upgrade_run_config(OmegaConf.load(saved_path))
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
