"""When the optimizer steps and how large its step may be: gradient accumulation and clipping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stepping:
    """The optimizer steps once every ``accumulate_grad_batches`` batches (and at the last batch
    of an epoch), on the mean of their gradients, clipped to a total norm of
    ``gradient_clip_val`` (None: no clipping)."""

    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1

    def __post_init__(self) -> None:
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"lit.gradient_clip_val must be positive or null, got {self.gradient_clip_val}.")
        if not (isinstance(self.accumulate_grad_batches, int) and self.accumulate_grad_batches >= 1):
            raise ValueError(f"lit.accumulate_grad_batches must be a positive integer, got {self.accumulate_grad_batches}.")

    def steps_after(self, batch_idx: int, is_last_batch: bool) -> bool:
        """Whether the optimizer steps after batch ``batch_idx`` of the epoch."""
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or is_last_batch

    def clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients ``optimizer`` is about to apply to a total norm of ``gradient_clip_val``."""
        if self.gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
