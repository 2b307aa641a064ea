"""The resolvers that vaelab's configs use (``${vaelab_root:}``, ``${vaelab_pid:}``,
``${vaelab_mode:...}``, ``${vaelab_direction:...}``, ``${vaelab_native_bf16:...}``), registered
once on import."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vaelab.metrics import metric_direction, metric_mode

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


def onednn_allows_bf16(cap: str | None) -> bool:
    """Whether oneDNN, capped at the instruction set ``cap`` (``ONEDNN_MAX_CPU_ISA``: AVX2,
    AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX, ...), may still use bfloat16 instructions."""
    cap = (cap or "ALL").upper()
    return cap in ("ALL", "DEFAULT") or any(tag in cap for tag in ("BF16", "FP16", "AMX", "AVX10"))


def native_bf16_precision(accelerator: str) -> str:
    """``bf16-mixed`` where the device of ``trainer.accelerator`` computes bfloat16 natively (a CPU
    with AVX512-BF16 or AMX that ``ONEDNN_MAX_CPU_ISA`` does not cap below them, a CUDA GPU from
    Ampere on), else ``32-true``: emulated bfloat16 is slower than float32, 14x on an AVX2 cap
    (docs/speed.md, "bf16 mixed precision: what it changes per CPU")."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = (accelerator in ("cpu", "auto") and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
                  and onednn_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA")))
    return "bf16-mixed" if native else "32-true"


if not OmegaConf.has_resolver("vaelab_native_bf16"):
    OmegaConf.register_new_resolver("vaelab_native_bf16", native_bf16_precision)
