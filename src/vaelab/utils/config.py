"""Where the configs live, and printing/saving of the composed config."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from vaelab.metrics import metric_direction, metric_mode
from vaelab.utils.run import atomic_write

log = logging.getLogger(__name__)

# the Hydra configs ship inside the package (src/vaelab/conf), so an installed vaelab finds them
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"

# paths.root_dir: the directory a command runs in, which holds outputs/ (and data/ by default);
# cached, so that a sweep's jobs in other processes resolve the same directories
if not OmegaConf.has_resolver("vaelab_root"):
    OmegaConf.register_new_resolver("vaelab_root", os.getcwd, use_cache=True)
# the process id in run directory names: two runs started in the same second never share one.
# Cached like Hydra's ${now:}: the jobs of a sweep that a launcher runs in other processes
# (submitit) receive the cache with their config and so resolve the same sweep directory.
if not OmegaConf.has_resolver("vaelab_pid"):
    OmegaConf.register_new_resolver("vaelab_pid", os.getpid, use_cache=True)

# which way optimized_metric improves: ModelCheckpoint's mode (max/min), a sweeper's direction
if not OmegaConf.has_resolver("vaelab_mode"):
    OmegaConf.register_new_resolver("vaelab_mode", metric_mode)
if not OmegaConf.has_resolver("vaelab_direction"):
    OmegaConf.register_new_resolver("vaelab_direction", metric_direction)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def native_bf16_precision(accelerator: str) -> str:
    """``bf16-mixed`` where the device of ``trainer.accelerator`` computes bfloat16 natively (a CPU
    with AVX512-BF16 or AMX, a CUDA GPU from Ampere on), else ``32-true``: emulated bfloat16 is
    slower than float32 (benchmarks/README.md, "bf16 mixed precision")."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = accelerator in ("cpu", "auto") and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return "bf16-mixed" if native else "32-true"


if not OmegaConf.has_resolver("vaelab_native_bf16"):
    OmegaConf.register_new_resolver("vaelab_native_bf16", native_bf16_precision)

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


def apply_extras(cfg: DictConfig) -> None:
    """Optional conveniences from ``cfg.extras``: silence Python warnings, print the config."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg, save_dir=cfg.paths.output_dir)
