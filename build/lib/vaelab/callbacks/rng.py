"""Random number generator states in checkpoints, so a resumed run draws what the
uninterrupted run would have drawn (shuffles, binarizations, z samples)."""

from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch


class RNGState(pl.Callback):
    """Save the Python and torch (CPU and CUDA) generator states with every checkpoint and
    put them back when training resumes from it. They are set again after the sanity check,
    whose validation steps draw random numbers that the uninterrupted run did not draw."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict
        self._restore()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.loaded = None  # restored once; later sanity checks belong to this run

    def _restore(self) -> None:
        if self.loaded is None:
            return
        random.setstate(self.loaded["python"])
        torch.set_rng_state(self.loaded["torch"])
        if "cuda" in self.loaded and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.loaded["cuda"])
