"""Learning-rate schedules over the training budget.

Each step sets every parameter group's lr from its *configured* value times the schedule's
factor, so a resumed run follows the configuration, not the checkpoint's lr. (``torch.optim.
lr_scheduler`` counts its own steps and restores its base rates from the checkpoint; the cosine
here also follows ``trainer.max_time``, a budget of wall-clock time.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer

SCHEDULES = ("constant", "cosine", "step", "tail")


def budget_spent(trainer: pl.Trainer, step: int) -> float:
    """The share of the training budget spent, in [0, 1]: optimizer steps over
    ``max_epochs``/``max_steps``, or elapsed over ``trainer.max_time``, whichever is further."""
    spent = [0.0]
    total = trainer.estimated_stepping_batches
    if math.isfinite(total) and total > 0:
        spent.append(step / total)
    for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
        remaining = timer.time_remaining()
        if remaining is not None:
            elapsed = timer.time_elapsed()
            spent.append(elapsed / max(elapsed + remaining, 1e-9))
    return min(1.0, max(spent))


class LRSchedule:
    """``constant`` keeps the configured rates; ``cosine`` anneals them to zero over the
    training budget (Loshchilov & Hutter 2017, no restarts); ``step`` multiplies them by
    ``lr_step["factor"]`` every ``lr_step["epochs"]`` epochs, down to ``lr_step["lowest"]``
    times their configured value (Maaloe et al.'s decay: 0.75 every 200 epochs, down to a tenth);
    ``tail`` keeps them until the last ``lr_tail`` share of the budget, then anneals them linearly
    to zero (the stable-then-decay schedule of Hu et al. 2024, without warm-up: a time budget
    spends most of its steps at the full rate and still ends annealed)."""

    def __init__(self, kind: str = "constant", lr_step: Mapping | None = None, lr_tail: float = 0.2) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"lit.lr_schedule={kind!r} must be one of {', '.join(SCHEDULES)}.")
        lr_step = dict(lr_step or {"epochs": 200, "factor": 0.75, "lowest": 0.1})
        if not (isinstance(lr_step.get("epochs"), int) and lr_step["epochs"] >= 1 and 0 < lr_step.get("factor", 0) <= 1
                and 0 <= lr_step.get("lowest", -1) <= 1 and set(lr_step) == {"epochs", "factor", "lowest"}):
            raise ValueError(f"lit.lr_step must be {{epochs: a positive integer, factor: in (0, 1], lowest: in [0, 1]}}, got {lr_step}.")
        if isinstance(lr_tail, bool) or not isinstance(lr_tail, (int, float)) or not 0 < lr_tail <= 1:
            raise ValueError(f"lit.lr_tail must be the share of the budget over which lr_schedule=tail anneals, in (0, 1], got {lr_tail!r}.")
        self.kind, self.lr_step, self.lr_tail = kind, lr_step, float(lr_tail)

    def factor(self, trainer: pl.Trainer, step: int, epoch: int) -> float:
        """What every configured learning rate is multiplied by at this step."""
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * budget_spent(trainer, step)))
        if self.kind == "tail":
            return min(1.0, (1 - budget_spent(trainer, step)) / self.lr_tail)
        if self.kind == "step":
            return max(self.lr_step["factor"] ** (epoch // self.lr_step["epochs"]), self.lr_step["lowest"])
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, configured: Sequence[Mapping], factor: float) -> float:
        """Set each parameter group's lr to its ``configured`` value times ``factor``; return the first."""
        for group, settings in zip(optimizer.param_groups, configured):
            group["lr"] = settings["lr"] * factor
        return optimizer.param_groups[0]["lr"]
