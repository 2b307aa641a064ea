"""An exponential moving average of the weights (Polyak averaging) for validation, checkpoints
and test:

    theta_ema <- d_t theta_ema + (1 - d_t) theta,   d_t = min(decay, (1 + t) / (10 + t))

after optimizer step t, so that early in training, while the weights move fast, the average
follows them closely."""

from __future__ import annotations

from itertools import chain

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, step: int) -> float:
    """d_t of the average after optimizer step ``step`` (the first is 1)."""
    return min(decay, (1 + step) / (10 + step))


class WeightEMA(WeightAveraging):
    """Lightning's weight averaging with the decay above, for ``lit.ema_decay``. The average
    starts from the initial weights. Validation runs on it (parameters and batch-norm
    statistics); every checkpoint's ``state_dict`` holds it, so evaluate.py and a pretrained
    part read it, and keeps the current weights beside it for a resumed run to train on. Each
    optimizer step updates it in one fused interpolation that never waits for the device."""

    def __init__(self, decay: float) -> None:
        if not (isinstance(decay, float) and 0.0 < decay < 1.0):
            raise ValueError(f"lit.ema_decay must lie strictly between 0 and 1 (e.g. 0.999), or be null for no average; got {decay!r}.")
        super().__init__(use_buffers=True)
        self.decay = decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The average starts as a copy of the module, taken before ``configure_model`` (which
        may compile the loss; the copy needs only the weights)."""
        if stage == "fit":
            self._average_model = AveragedModel(pl_module, use_buffers=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The module reached its device and precision after ``setup``: the average follows.
        The tensors to interpolate (and batch norm's step counts, copied) are paired once here.
        Half-precision weights are refused: the average's small updates would round away."""
        low = {p.dtype for p in pl_module.parameters()} & {torch.bfloat16, torch.float16}
        if low:
            raise ValueError(
                f"lit.ema_decay keeps the average in the weights' dtype, and trainer.precision={trainer.precision} holds them in "
                f"{', '.join(sorted(str(dtype).removeprefix('torch.') for dtype in low))}, where a step's update of the average, "
                f"{1 - self.decay:.2g} of the difference, mostly rounds away. Use trainer.precision=bf16-mixed (layers in bfloat16, "
                "weights in float32) or 32-true, or lit.ema_decay=null."
            )
        average = self._average_model.module
        pairs = list(zip(chain(average.parameters(), average.buffers()), chain(pl_module.parameters(), pl_module.buffers())))
        for averaged, current in pairs:
            averaged.data = averaged.data.to(current.device, current.dtype)
        self._floats = [list(side) for side in zip(*[pair for pair in pairs if pair[0].is_floating_point()])]
        self._counters = [list(side) for side in zip(*[pair for pair in pairs if not pair[0].is_floating_point()])]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._latest_update_step:
            return  # no optimizer step since the last update (gradient accumulation)
        torch._foreach_lerp_(*self._floats, 1.0 - ema_decay(self.decay, step))
        if self._counters:
            torch._foreach_copy_(*self._counters)
        self._latest_update_step = step

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._average_model is not None:  # outside fit the checkpoint's averaged weights are the ones to use
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
