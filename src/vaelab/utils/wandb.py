"""Weights & Biases mode: online when credentials exist, otherwise offline (sync later)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

MODES = ("online", "offline", "disabled")


def wandb_host() -> str | None:
    """The host W&B logs in to, as wandb itself resolves it (``WANDB_BASE_URL``, its settings
    files, or its default, which is not always api.wandb.ai)."""
    import wandb

    settings = wandb.Settings()
    settings.update_from_system_settings()  # ~/.config/wandb/settings, where `wandb login --host` writes
    settings.update_from_env_vars(dict(os.environ))
    return urlparse(settings.base_url).hostname


def has_wandb_credentials() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file holds a key for W&B's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = wandb_host()
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str | None) -> str:
    """The mode to run W&B in: ``mode`` if given, else ``$WANDB_MODE``, else online with
    credentials and offline without."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode is None:
        return "online" if has_wandb_credentials() else "offline"
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)} (or null for automatic).")
    return mode
