"""Weights & Biases mode: online when credentials exist, otherwise offline (sync later)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

MODES = ("online", "offline", "disabled")


def has_wandb_credentials() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file holds a key for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
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
