"""What every latent-variable model shares: turn ``objective(batch)`` into the training loss,
log the per-example terms of ``elbo(batch)`` on validation and test, build the optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch

from vaelab.distributions import Likelihood
from vaelab.elbo import bits_per_dim, iwae_bound


class LatentVariableModel(pl.LightningModule):
    """Subclasses implement ``encode``, ``decode``, ``elbo``, ``sample`` and ``reconstruct``.

    ``elbo(batch)`` returns a dict of per-example tensors in nats; the key ``elbo`` is the
    bound that training maximises, every other key is logged beside it. ``likelihood`` picks
    the observation model p(x|z) (``vaelab.distributions.Likelihood``); decoders emit
    ``decoder_shape`` = (parameters per channel x C, H, W) outputs per image. ``compile=True``
    compiles the training loss with ``torch.compile``.
    """

    # importance samples of the test-time IWAE bound (0: not computed); evaluate.py sets them
    iwae_k = 0
    # at most this many decoder rows (images x samples) per pass while computing it
    iwae_rows = 20_000
    # decoder rows per importance sample and image (M2 decodes every class)
    rows_per_sample = 1

    def __init__(
        self,
        input_shape: Sequence[int],
        z_dim: int,
        likelihood: str | Mapping | None,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if z_dim <= 0:
            raise ValueError(f"model.z_dim must be a positive integer, got {z_dim}.")
        self.input_shape = tuple(input_shape)
        self.z_dim = z_dim
        self.likelihood = Likelihood.from_spec(likelihood)
        channels, *size = self.input_shape
        self.decoder_shape = (self.likelihood.params_per_channel * channels, *size)
        self.optimizer_factory = optimizer
        self.compile_objective = compile

    def configure_model(self) -> None:
        """With ``compile=True``, compile the training loss ``objective`` (networks, likelihood
        and bound, forward and backward) with ``torch.compile``; parameters keep their names,
        so checkpoints load with or without it."""
        if self.compile_objective and "objective" not in vars(self):
            self.objective = torch.compile(self.objective)

    def setup(self, stage: str) -> None:
        """Check that the data suits the likelihood: binary pixels for Bernoulli, 8-bit for the others."""
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        binary = getattr(datamodule, "binary", None)
        if binary is None or binary == self.likelihood.binary:
            return
        if self.likelihood.binary:
            raise ValueError(
                f"likelihood=bernoulli models binary pixels, but {type(datamodule).__name__} gives 8-bit ones; "
                "use likelihood=logistic (or gaussian), or binarize the data (data.binarize=true on MNIST)."
            )
        raise ValueError(
            f"likelihood={self.likelihood.type} models 8-bit pixels, but {type(datamodule).__name__} gives "
            "binarized ones; set data.binarize=false, or use likelihood=bernoulli."
        )

    def elbo(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def log_weights(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i|x) of k importance samples, shape (k, B)."""
        raise NotImplementedError

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """The k-sample importance-weighted bound per example, drawing the samples in passes
        of at most ``iwae_rows`` decoder rows."""
        per_pass = max(1, self.iwae_rows // (len(x) * self.rows_per_sample))
        sizes = [min(per_pass, k - start) for start in range(0, k, per_pass)]
        return iwae_bound(torch.cat([self.log_weights(x, y, n) for n in sizes]))

    def objective(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on a training batch and the scalars to log with it; here the
        negative mean ELBO of a fully labeled (or unlabeled) batch ``(x, y)``."""
        if isinstance(batch, dict):
            raise ValueError(
                f"{type(self).__name__} trains on plain batches, but data.labeled="
                f"{self.trainer.datamodule.labeled} split the training set into labeled and "
                "unlabeled parts; use data.labeled=null (or model=ssvae for semi-supervised training)."
            )
        means = {name: value.mean() for name, value in self.elbo(batch).items()}
        return -means["elbo"], means

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.objective(batch)
        if not torch.isfinite(loss):
            self._raise_non_finite(metrics)
        if self._loggers_write_this_step():
            self.log_dict({f"train/{name}": value for name, value in metrics.items()}, on_step=True, on_epoch=False)
        return loss

    def _raise_non_finite(self, metrics: dict[str, torch.Tensor]) -> None:
        values = ", ".join(f"train/{name}={float(value):.4g}" for name, value in metrics.items())
        bad = [f"train/{name}" for name, value in metrics.items() if not torch.isfinite(value).all()]
        raise FloatingPointError(
            f"Non-finite loss at step {self.global_step} (epoch {self.current_epoch}): "
            f"{', '.join(bad) or 'the loss'} went non-finite ({values}). Training stopped before "
            "this step's update; checkpoints/last.ckpt holds the last finite weights. Lower "
            "model.optimizer.lr or set trainer.gradient_clip_val, then resume with ckpt_path=...last.ckpt."
        )

    def _loggers_write_this_step(self) -> bool:
        """Lightning hands training-step metrics to the loggers only every
        ``log_every_n_steps`` steps; calling ``self.log`` on the other steps costs ~9% of a
        small model's CPU step and shows up nowhere (measured by benchmarks/throughput.py)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def evaluation_step(self, batch, stage: str) -> None:
        self.log_terms(self.elbo(batch), stage)

    def log_terms(self, terms: dict[str, torch.Tensor], stage: str) -> None:
        """Log the mean of every per-example term under ``<stage>/``, averaged over the epoch;
        for 8-bit likelihoods also the ELBO in bits per dimension (``bpd``)."""
        if "elbo" in terms and not self.likelihood.binary:
            terms = {**terms, "bpd": bits_per_dim(terms["elbo"], math.prod(self.input_shape))}
        self.log_dict(
            {f"{stage}/{name}": value.mean() for name, value in terms.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(next(iter(terms.values()))),
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")
        if self.iwae_k:
            bound = self.iwae(*batch, self.iwae_k)
            terms = {"nll_iwae": -bound}
            if not self.likelihood.binary:
                terms["bpd_iwae"] = bits_per_dim(bound, math.prod(self.input_shape))
            self.log_terms(terms, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without an optimizer; pass "
                "optimizer=functools.partial(torch.optim.Adam, lr=...) (model.optimizer in the config)."
            )
        return self.optimizer_factory(self.parameters())
