"""Weights & Biases: the mode (online when credentials exist, otherwise offline, to sync later),
one W&B run per run directory (a resumed run continues it) and best-value summaries."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from vaelab.utils.run import atomic_write

MODES = ("online", "offline", "disabled")
RUN_ID = Path("wandb") / "run_id"  # in a run directory: the W&B run it logs to


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


def wandb_run_id(save_dir: str | Path, resume_from: str | None = None) -> tuple[str, bool]:
    """The id of the W&B run that a run writing to ``save_dir`` logs to, and whether that run
    exists already: the id stored in ``save_dir`` (a run resumed in place, a requeued job), else
    the one stored beside the checkpoint it resumes from (``<run>/checkpoints/<file>``), else a
    new id."""
    candidates = [Path(save_dir)]
    if resume_from and "://" not in str(resume_from):
        candidates.append(Path(resume_from).resolve().parent.parent)
    for run_dir in candidates:
        if (run_dir / RUN_ID).is_file():
            return (run_dir / RUN_ID).read_text().strip(), True
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)), False


def store_wandb_run_id(save_dir: str | Path, run_id: str) -> None:
    """Write ``run_id`` into the run directory, for a resumed run to find."""
    with atomic_write(Path(save_dir) / RUN_ID) as file:
        file.write(run_id + "\n")


def summarise_best(experiment) -> None:
    """Make the W&B summary of each validation metric its best value, not its last: the highest
    bound or accuracy, the lowest bits/dim or loss (``vaelab.metrics``)."""
    from vaelab.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER

    for names, summary in ((HIGHER_IS_BETTER, "max"), (LOWER_IS_BETTER, "min")):
        for name in sorted(names):
            experiment.define_metric(f"val/{name}", summary=summary)
