"""Where the configs live, and printing/saving of the composed config (importing it registers
the config resolvers, ``vaelab.utils.resolvers``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

import vaelab.utils.resolvers  # noqa: F401  (registers the resolvers the configs use)
from vaelab.utils.run import atomic_write

log = logging.getLogger(__name__)

# the Hydra configs ship inside the package (src/vaelab/conf), so an installed vaelab finds them
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"

FIRST_FIELDS = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_dir: str | None = None, order: Sequence[str] = FIRST_FIELDS) -> None:
    """Print the resolved config as a rich tree (main groups first) and, with ``save_dir``,
    write it there as ``config_tree.log`` and ``config.yaml`` (in the process of rank 0 only)."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for field in fields:
        branch = tree.add(field, style="bold", guide_style="dim")
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_dir is not None:
        with atomic_write(Path(save_dir) / "config_tree.log") as file:
            rich.print(tree, file=file)
        with atomic_write(Path(save_dir) / "config.yaml") as file:
            OmegaConf.save(cfg, file, resolve=True)


@contextmanager
def run_log() -> Iterator[None]:
    """Keep the run's ``<task>.log`` (train.log, evaluate.log) whole for the block: Lightning's
    records, which its own handlers would keep from the root logger whose handlers Hydra set up
    (the console and that file), and the error that ends the run."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        yield
    except Exception as error:  # the log says how the run ended, as the console does
        log.error("%s: %s", type(error).__name__, error)
        raise


def apply_extras(cfg: DictConfig) -> None:
    """Optional conveniences from ``cfg.extras``: silence Python warnings, print the config."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg, save_dir=cfg.paths.output_dir)
