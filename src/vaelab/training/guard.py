"""The finiteness guard: training stops at a non-finite loss, or a non-finite gradient of a finite
loss, before that step's update is applied."""

from __future__ import annotations

import math

import torch

ADVICE = ("Training stopped without applying that step's update, and no checkpoint was written with these weights. "
          "Lower lit.optimizer.lr or set lit.gradient_clip_val, then resume from the newest good checkpoint.")


class FinitenessGuard:
    """On the CPU reading the loss costs nothing: a bad step raises at once. On an accelerator
    that read would wait for the device every step, so there the first bad step is recorded on
    the device, the updates of bad steps are skipped (their gradients zeroed), and the run stops
    at ``raise_if_bad``, called when the module next logs."""

    def __init__(self) -> None:
        self._bad_step: torch.Tensor | None = None  # the first step with a non-finite loss
        self._bad_gradient_step: torch.Tensor | None = None  # ... with a finite loss and a non-finite gradient
        self._skip_update: torch.Tensor | None = None  # this step's update is to be skipped

    @staticmethod
    def reads_every_step(tensor: torch.Tensor) -> bool:
        """Reading a CPU tensor costs nothing; reading an accelerator's waits for the device."""
        return tensor.device.type == "cpu"

    def check_loss(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], step: int, epoch: int) -> None:
        bad = ~torch.isfinite(loss)
        if self.reads_every_step(loss):
            if bad:
                raise_non_finite_loss(step, epoch, metrics)
            return
        self._bad_step = self._record(self._bad_step, bad, step)

    def check_gradients(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: int,
                        scaler_skips: bool = False) -> None:
        """Before ``optimizer`` steps (gradients unscaled): stop at a non-finite gradient of a
        finite loss (CPU) or record it (accelerators); then zero the gradients of a skipped update.
        ``module`` names the parameters in the error. ``scaler_skips``: a loss scaler skips the
        steps with non-finite gradients itself (float16 mixed precision), so none is checked."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if grads and not scaler_skips:
            bad = ~torch.isfinite(self.gradient_total(grads))
            if self.reads_every_step(bad):  # names are looked up only when it fails
                failing = {id(p) for p in params if not torch.isfinite(p.grad).all()} if bad else set()
                names = [name for name, p in module.named_parameters() if id(p) in failing]
                if names:  # (an overflowing total alone is not a non-finite gradient)
                    raise_non_finite_gradient(step, epoch, f", in {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}")
            else:
                if self._skip_update is not None:
                    bad = bad & ~self._skip_update  # a non-finite loss is recorded as such
                self._bad_gradient_step = self._record(self._bad_gradient_step, bad, step)
        if self._skip_update is not None:
            for grad in grads:
                grad.masked_fill_(self._skip_update, 0)
            self._skip_update = None

    def gradient_total(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """A scalar that is finite when every gradient is. On the CPU the sum of all entries, the
        cheapest read of each (it can also overflow, hence the look at each tensor before raising);
        on accelerators the largest magnitude (the max norm, exact), in one multi-tensor kernel."""
        if self.reads_every_step(grads[0]):
            return torch.stack([grad.sum() for grad in grads]).sum()
        return torch.nn.utils.get_total_norm(grads, norm_type=math.inf)

    def raise_if_bad(self, metrics: dict[str, torch.Tensor], epoch: int) -> None:
        """Raise for a bad step recorded on the device (this reads the device once)."""
        if self._bad_step is not None and int(self._bad_step) >= 0:
            raise_non_finite_loss(int(self._bad_step), epoch, metrics)
        if self._bad_gradient_step is not None and int(self._bad_gradient_step) >= 0:
            raise_non_finite_gradient(int(self._bad_gradient_step), epoch, "")

    def _record(self, first: torch.Tensor | None, bad: torch.Tensor, step: int) -> torch.Tensor:
        """On the device, without reading it: skip this step's update if ``bad``, and return the
        first bad step recorded (``first``, -1 while there is none), now ``step`` if it is the first."""
        self._skip_update = bad if self._skip_update is None else self._skip_update | bad
        if first is None:
            first = torch.full((), -1, device=bad.device)
        return torch.where((first < 0) & bad, step, first)


def raise_non_finite_gradient(step: int, epoch: int, where: str) -> None:
    raise FloatingPointError(f"Non-finite gradient at step {step} (epoch {epoch}) of a finite loss{where}. {ADVICE}")


def raise_non_finite_loss(step: int, epoch: int, metrics: dict[str, torch.Tensor]) -> None:
    values = ", ".join(f"train/{name}={float(value.detach()):.4g}" for name, value in metrics.items())
    bad = [f"train/{name}" for name, value in metrics.items() if not torch.isfinite(value).all()]
    raise FloatingPointError(
        f"Non-finite loss at step {step} (epoch {epoch}): {', '.join(bad) or 'the loss'} went non-finite ({values}). {ADVICE}"
    )
