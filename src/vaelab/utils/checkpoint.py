"""Checks that a checkpoint exists, is one, and fits the configured model."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


def check_checkpoint(path: str, model: pl.LightningModule) -> None:
    """Raise one clear error when ``path`` is missing, unreadable, or holds weights of another
    model than ``model`` (another ``model=`` choice or other layer sizes)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["state_dict"]
    except Exception as error:
        raise ValueError(f"ckpt_path={path} is not a readable Lightning checkpoint ({type(error).__name__}: {error}).") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    resized = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or unexpected or resized:
        details = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", resized))
            if keys
        )
        raise ValueError(
            f"ckpt_path={path} does not fit model {type(model).__name__} ({details}). Use the model "
            "and sizes it was trained with, e.g. the run's config.yaml: model=... model.z_dim=..."
        )
