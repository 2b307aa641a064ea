"""The results registry: every benchmark run appends one record to ``results/registry.jsonl``.

A record says what ran (script, exact command, overrides, commit, date), where (the machine: CPU
model, cores and threads used, the ISA features that change speed, GPUs; torch and Lightning
versions), how (precision, seeds, split seeds, budget, whether other work shared the machine) and
what came out (``figures``). Tables in the docs are rendered from these records, never typed.

    from registry import append          # benchmarks/ is the script's directory
    append("throughput.py", figures={...}, precision="32-true", budget="300 steps")

Fields a table reads: ``setting`` (a key of ``PUBLISHED``, or a name of its own for what no paper
reports), ``variant`` (the overrides that depart from that setting's defaults; null for the
defaults themselves) and ``status``: ``current``, or ``superseded`` with a ``reason`` (and
``superseded_by``, the ``id`` of the record that replaces it). Figures of a model's quality hold
``metric``, ``final`` (the final checkpoint), ``best`` (the best one), ``best_by`` (the metric that
chose it) and ``best_labels`` (how many labeled validation images that choice read). Records
migrated from earlier prose carry ``migrated: true`` and their ``source``; what the prose did not
say is null. ``GOALS`` are the targets (a figure of a setting, on a kind of machine, within a
budget, on each split seed) that ``render.py`` holds the records against.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaelab.utils.resolvers import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"
REGISTRY = RESULTS / "registry.jsonl"
ROOT = RESULTS.parent.parent

# setting -> what is compared, the published figure (None: a goal, or nothing comparable) and its source
PUBLISHED: dict[str, tuple[str, float | None, str]] = {
    "m2_mnist_100": ("test error, %", 11.97, "Kingma et al. 2014, M2"),
    "m2_mnist_600": ("test error, %", 4.94, "Kingma et al. 2014, M2"),
    "m2_mnist_1000": ("test error, %", 3.60, "Kingma et al. 2014, M2"),
    "m2_mnist_3000": ("test error, %", 3.92, "Kingma et al. 2014, M2"),
    "m2_mnist_100_labels_alone": ("test error, %", 25.81, "Kingma et al. 2014, NN baseline on the labels alone"),
    "vae_mnist": ("test NLL (IWAE bound), nats", 86.76, "Burda et al. 2016, VAE, 1 stochastic layer"),
    "vae_mnist_iwae5": ("test NLL (IWAE bound), nats", 85.54, "Burda et al. 2016, IWAE k = 5, 1 stochastic layer"),
    "vae_mnist_iwae50": ("test NLL (IWAE bound), nats", 84.78, "Burda et al. 2016, IWAE k = 50, 1 stochastic layer"),
    "vae_mnist_planar": ("test NLL (IWAE bound), nats", None, "Rezende & Mohamed 2015 report a bound with other networks"),
    "vae_mnist_iaf": ("test NLL (IWAE bound), nats", None, "Kingma et al. 2016 report convolutional models"),
    "vae_mnist_ar": ("test NLL (IWAE bound), nats", None, "goal: <= 85 with 1 stochastic layer"),
    "cvae_mnist": ("samples classified as their class, %", None, "goal: >= 98"),
    "m2_svhn_1000": ("test error, %", 36.02, "Kingma et al. 2014, M1+M2"),
    "m1m2_mnist_100": ("test error, %", 3.33, "Kingma et al. 2014, M1+M2"),
    "m1m2_svhn_1000": ("test error, %", 36.02, "Kingma et al. 2014, M1+M2"),
    "adgm_mnist_100": ("test error, %", 0.96, "Maaloe et al. 2016, ADGM"),
    "sdgm_mnist_100": ("test error, %", 1.32, "Maaloe et al. 2016, SDGM"),
    "sdgm_svhn_1000": ("test error, %", 16.61, "Maaloe et al. 2016, SDGM"),
}


@dataclass(frozen=True)
class Goal:
    """A target the project measures itself against: ``figure`` (a key of a record's figures; ``a.b``
    reads ``figures["a"]["b"]``) of ``setting`` at most ``bound`` (at least, with ``at_least``), on
    a machine of kind ``machine`` (None: any), within a budget of at most ``minutes`` (None: any
    budget, e.g. for a figure that is itself a time), on each of ``split_seeds`` (empty: no split).
    ``stretch`` is a harder bound of the same figure."""

    what: str
    setting: str
    figure: str
    bound: float
    unit: str
    machine: str | None = None
    minutes: float | None = None
    split_seeds: tuple[int, ...] = ()
    stretch: float | None = None
    at_least: bool = False

    def met(self, value: float | None, bound: float) -> bool:
        return value is not None and (value >= bound if self.at_least else value <= bound)


SEEDS = (0, 1, 2, 3, 4)
# the time-to-accuracy and speed goals; rendered, each against the records that answer it, by ``render.py``
GOALS: list[Goal] = [
    Goal("M2, 100 labels: 88 % validation accuracy within 12 minutes", "m2_mnist_100", "minutes_to_val_acc.88", 12, " min",
         machine="AVX2-only CPU", split_seeds=SEEDS),
    Goal("M2, 100 labels: final test error within 60 minutes", "m2_mnist_100", "final", 8, " %",
         machine="AVX2-only CPU", minutes=60, split_seeds=SEEDS, stretch=5),
    Goal("SDGM, 100 labels: final test error within 60 minutes", "sdgm_mnist_100", "final", 2.5, " %",
         machine="AVX2-only CPU", minutes=60, split_seeds=SEEDS, stretch=2),
    Goal("SDGM, 100 labels: final test error within 10 minutes", "sdgm_mnist_100", "final", 2, " %",
         machine="GPU", minutes=10, split_seeds=SEEDS),
    Goal("VAE: training epoch", "gpu", "train_epoch_s.vae", 1, " s", machine="GPU"),
    Goal("M2: training epoch", "gpu", "train_epoch_s.ssvae", 3, " s", machine="GPU"),
    Goal("M2: epoch speed over Pyro's ss_vae_M2.py, one core each", "speed_pyro", "epoch_speed_vs_pyro", 1.3, "×", at_least=True),
]

# /proc/cpuinfo flags that change how fast a model trains (and in which precision)
SPEED_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu() -> dict[str, Any]:
    """The CPU: model name, logical cores, torch's threads, the speed-relevant ISA features it
    has and any cap on what oneDNN may use (``ONEDNN_MAX_CPU_ISA``)."""
    model = platform.processor() or platform.machine()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:  # not Linux
        pass
    flags = cpu_flags()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": [name for flag, name in SPEED_FLAGS.items() if flag in flags],
        "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def shared_option(parser: argparse.ArgumentParser) -> None:
    """``--shared/--no-shared``: whether other work shared the machine during the run (``shared``)."""
    parser.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None,
                        help="record that other work shared the machine (--no-shared: it did not; default: unknown)")


def machine() -> dict[str, Any]:
    """The machine a figure came from: CPU, GPUs, torch, Lightning and Python versions."""
    import pytorch_lightning as pl

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": cpu(),
        "gpu": gpus[0] if gpus else None,
        "gpu_count": len(gpus),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }


def commit() -> str | None:
    """The checked-out commit, with ``+dirty`` when the work tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def append(
    script: str,
    figures: dict[str, Any],
    *,
    overrides: list[str] | None = None,
    precision: str | None = None,
    seeds: list[int] | None = None,
    split_seeds: list[int] | None = None,
    budget: str | None = None,
    shared: bool | None = None,
    notes: str | None = None,
    registry: Path | None = None,
    setting: str | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """Append one record of a finished run to the registry and return it. ``shared`` says whether
    other work shared the machine (None: unknown); ``budget`` is the time or step budget in words;
    ``setting`` and ``variant`` place the run in the rendered tables (module docstring)."""
    record = {
        "script": script,
        "setting": setting,
        "variant": variant,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "overrides": overrides or [],
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "precision": precision,
        "seeds": seeds,
        "split_seeds": split_seeds,
        "budget": budget,
        "shared": shared,
        "figures": figures,
        "notes": notes,
        "status": "current",
    }
    record["id"] = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    path = registry or Path(os.environ.get("VAELAB_REGISTRY", REGISTRY))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def load(registry: Path | None = None) -> list[dict[str, Any]]:
    """Every record of the registry (``VAELAB_REGISTRY``, else ``results/registry.jsonl``), in order;
    an ``id`` that two records share is an error."""
    path = registry or Path(os.environ.get("VAELAB_REGISTRY", REGISTRY))
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: record ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return records
