"""Helpers for the entry points: config paths and printing, instantiation, W&B mode; run
directories and atomic files (``run``); checkpoint reading (``checkpoints``)."""

from vaelab.utils.config import CONFIG_DIR, apply_extras, print_config_tree, run_log
from vaelab.utils.instantiate import instantiate_callbacks, instantiate_loggers, log_hyperparameters
from vaelab.utils.wandb import resolve_wandb_mode

__all__ = [
    "CONFIG_DIR",
    "apply_extras",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "print_config_tree",
    "resolve_wandb_mode",
    "run_log",
]
