"""What every latent-variable model shares: reduce the per-example terms returned by
``elbo(batch)``, log each of them, and return the negative ELBO as the loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch


class LatentVariableModel(pl.LightningModule):
    """Subclasses implement ``encode``, ``decode``, ``elbo``, ``sample`` and ``reconstruct``.

    ``elbo(batch)`` returns a dict of per-example tensors in nats; the key ``elbo`` is the
    bound that training maximises, every other key is logged beside it.
    """

    def __init__(self, optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None):
        super().__init__()
        self.optimizer_factory = optimizer

    def elbo(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _step(self, batch, stage: str) -> torch.Tensor:
        terms = self.elbo(batch)
        means = {f"{stage}/{name}": value.mean() for name, value in terms.items()}
        training = stage == "train"
        if not training or self._loggers_write_this_step():
            self.log_dict(
                means,
                on_step=training,
                on_epoch=not training,
                sync_dist=not training,
                batch_size=len(terms["elbo"]),
            )
        return -means[f"{stage}/elbo"]

    def _loggers_write_this_step(self) -> bool:
        """Lightning hands training-step metrics to the loggers only every
        ``log_every_n_steps`` steps; calling ``self.log`` on the other steps costs ~9% of a
        small model's CPU step and shows up nowhere (measured by benchmarks/throughput.py)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without an optimizer; pass "
                "optimizer=functools.partial(torch.optim.Adam, lr=...) (model.optimizer in the config)."
            )
        return self.optimizer_factory(self.parameters())
