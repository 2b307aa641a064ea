"""The one LightningModule: trains any model of the ``vaelab.models.base`` interface by an
objective (``vaelab.objectives``), steps the optimizer, logs the terms and the accuracy.
Around each step it uses the finiteness guard, the stepping rules and the learning-rate schedule
of ``vaelab.training``; the test-time importance-weighted bound is ``vaelab.iwae``'s."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vaelab.elbo import bits_per_dim, class_information
from vaelab.iwae import Interrupted, importance_weighted
from vaelab.models.base import LatentModel
from vaelab.objectives import DataFacts, Objective, model_kind
from vaelab.training import FinitenessGuard, LRSchedule, Stepping, WeightEMA

log = logging.getLogger(__name__)

Optimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class LitModel(pl.LightningModule):
    """Trains ``model`` by minimising ``objective``'s loss with ``optimizer`` (a partial of a
    torch optimizer), its learning rate following ``lr_schedule`` (``training.LRSchedule``),
    stepped by hand (Lightning's automatic loop costs ~4 % of a small model's step) after
    ``accumulate_grad_batches`` batches with gradients clipped at ``gradient_clip_val``;
    ``compile=True`` compiles the loss with ``torch.compile`` in ``compile_mode`` (``reduce-overhead``:
    CUDA graphs replay the step's kernels). ``ema_decay``: validation, checkpoints and test use
    an exponential moving average of the weights (``training.WeightEMA``). ``data`` holds the
    facts about the data that the entry point hands in. Validation and test log every term of the model's bound
    (and the objective's ``validation_terms``); for models with a classifier also U(x) with the
    classifier's cross-entropy, accuracy and, in test, the confusion matrix. ``iwae_k`` > 0 adds
    the k-sample importance-weighted bound to the test metrics, drawn in passes of at most
    ``iwae_rows`` decoder rows. ``objective`` may be None for a module that only evaluates;
    ``model_config`` is the resolved config the model was built from (with the settings a stage
    chose), kept in checkpoints: a resume or evaluation rebuilds the same model from it."""

    def __init__(
        self,
        model: LatentModel,
        objective: Objective | None = None,
        optimizer: Optimizer | None = None,
        lr_schedule: str = "constant",
        lr_step: Mapping | None = None,
        lr_tail: float = 0.2,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        compile: bool = False,
        compile_mode: str | None = None,
        ema_decay: float | None = None,
        iwae_k: int = 0,
        iwae_rows: int = 20_000,
        data: DataFacts | None = None,
        model_config: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.schedule = LRSchedule(lr_schedule, lr_step, lr_tail)
        self.stepping = Stepping(gradient_clip_val, accumulate_grad_batches)
        if not (isinstance(iwae_k, int) and iwae_k >= 0):
            raise ValueError(f"eval.iwae_k must be a non-negative integer, got {iwae_k}.")
        self.data = data or DataFacts()
        self.data.check_likelihood(model)
        if objective is not None:
            objective.check(model, self.data)
        if optimizer is not None:
            try:  # the optimizer checks its settings when it is built: build one now, on a stand-in
                optimizer([torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError, RuntimeError) as error:
                hint = " (set lit.optimizer.fused=null: this optimizer has no fused implementation)" if "fused" in str(error) else ""
                raise ValueError(f"lit.optimizer: {error}{hint}") from None
        self.model, self.objective, self.optimizer_factory = model, objective, optimizer
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"lit.compile_mode={compile_mode!r} is not one of torch.compile's modes: {', '.join(map(str, COMPILE_MODES))}.")
        self.compile_loss, self.compile_mode = compile, compile_mode
        self.iwae_k, self.iwae_rows = iwae_k, iwae_rows
        self.guard = FinitenessGuard()
        self.ema = WeightEMA(ema_decay) if ema_decay is not None else None
        self._configured_groups: list[dict] = []  # the optimizer's settings as configured
        self._checkpoint_groups: list[dict] | None = None  # ... and as configured for a resumed run
        self.automatic_optimization = False
        # resolved values (the objective's alpha) are saved, so checkpoints and loggers show what trained
        self.save_hyperparameters({
            "model": model_kind(model), "objective": objective.settings() if objective else None,
            "lr_schedule": lr_schedule, "lr_step": self.schedule.lr_step, "lr_tail": self.schedule.lr_tail, "gradient_clip_val": gradient_clip_val,
            "accumulate_grad_batches": accumulate_grad_batches, "ema_decay": ema_decay, "labeled": self.data.labeled,
            "train_size": self.data.train_size, "model_config": dict(model_config or {}),
        })
        if model.has_classifier:
            self.val_acc = MulticlassAccuracy(model.num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(model.num_classes, average="micro")
            self.test_confusion = MulticlassConfusionMatrix(model.num_classes)  # rows: true class

    @property
    def trained_bound(self) -> str:
        """The bound training maximises (the model's own without an objective)."""
        return self.objective.trained_bound(self.model) if self.objective else self.model.bound_name

    # -- building ------------------------------------------------------------------------
    def configure_model(self) -> None:
        """With ``compile=True``, compile ``loss`` (networks, likelihood and bound, forward and
        backward); parameters keep their names, so checkpoints load with or without it."""
        if self.compile_loss and "loss" not in vars(self):
            self.loss = torch.compile(self.loss, mode=self.compile_mode)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self.ema] if self.ema else []

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_groups = checkpoint.get("configured_optimizer")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            raise RuntimeError(
                "LitModel was built without an optimizer; pass "
                "optimizer=functools.partial(torch.optim.Adam, lr=...) (lit.optimizer in the config)."
            )
        optimizer = self.optimizer_factory(self.model.parameters())
        self._configured_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        return optimizer

    def on_train_start(self) -> None:
        """On resume Lightning restores the optimizer's settings from the checkpoint: the
        configured ones (lr, betas, weight decay...) win, so a run resumed with a lower
        ``lit.optimizer.lr`` trains with it; the log says what changed."""
        if self.objective is None:
            raise RuntimeError("LitModel was built without an objective; pass one (objective= in the config) to train.")
        optimizer = self.optimizers().optimizer
        groups = optimizer.param_groups
        before = self._checkpoint_groups or [dict(group) for group in groups]
        for group, configured, old in zip(groups, self._configured_groups, before):
            changed = [f"{k} {v} (checkpoint: {old[k]})" for k, v in configured.items() if k in old and old[k] != v]
            if changed:
                log.info("Resuming with the configured optimizer settings: %s.", ", ".join(changed))
            group.update(configured)
            if group.get("fused"):  # a fused update keeps its step count beside the parameters
                for param in group["params"]:
                    state = optimizer.state.get(param, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(param.device, torch.float32)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["configured_optimizer"] = self._configured_groups

    # -- training ------------------------------------------------------------------------
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss on a training batch and the scalars to log with it."""
        return self.objective(self.model, batch, self.global_step)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.loss(batch)
        self.guard.check_loss(loss, metrics, self.global_step, self.current_epoch)
        writes = self._loggers_write_this_step()
        if writes:
            self.guard.raise_if_bad(metrics, self.current_epoch)
        optimizer = self.optimizers()
        self.manual_backward(loss / self.stepping.accumulate_grad_batches)
        if self.stepping.steps_after(batch_idx, self.trainer.is_last_batch):
            factor = self.schedule.factor(self.trainer, self.global_step, self.current_epoch)
            metrics["lr"] = self.schedule.apply(optimizer, self._configured_groups, factor)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if writes:
            for name, value in metrics.items():  # the progress bar shows the bound
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == self.model.bound_name)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The guard checks the gradients, then they are clipped, both on their true scale. Under
        float16 mixed precision the loss scaler unscales them here for a fused optimizer too
        (Lightning leaves that to its step, too late for both, and refuses to clip), and a
        non-finite gradient is the scaler's to skip: it lowers the scale and goes on."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        self.guard.check_gradients(self.model, optimizer, self.global_step, self.current_epoch, scaler_skips=scaler is not None)
        self.stepping.clip(optimizer)

    def on_train_epoch_end(self) -> None:
        self.guard.raise_if_bad({}, self.current_epoch)

    def _loggers_write_this_step(self) -> bool:
        """Lightning hands training-step metrics to the loggers only every
        ``log_every_n_steps`` steps; calling ``self.log`` on the other steps costs ~9% of a
        small model's CPU step and shows up nowhere (measured by benchmarks/throughput.py)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    # -- evaluation ----------------------------------------------------------------------
    def evaluation_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Per-example terms of a labeled evaluation batch, and q(y|x)'s logits for models that
        classify: their bound is U(x) (labels unused) with the classifier's ``ce`` beside it."""
        if not self.model.has_classifier:
            return self.model.bound(x, y).as_dict(), None
        logits = self.model.classify(x)
        terms = self.model.bound(x, qy_logits=logits).as_dict()
        terms["ce"] = F.cross_entropy(logits, y, reduction="none")
        terms.update(class_information(logits))
        return terms, logits

    def validation_step(self, batch, batch_idx: int) -> None:
        terms, logits = self.evaluation_terms(*batch)
        if self.objective is not None:
            terms.update(self.objective.validation_terms(self.model, *batch))
        self.log_terms(terms, "val")
        if logits is not None:
            self.val_acc(logits, batch[1])
            self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        terms, logits = self.evaluation_terms(x, y)
        if self.iwae_k:
            terms[self.model.bound_name.replace("elbo", "nll_iwae")] = -self.test_iwae(x, y)
        self.log_terms(terms, "test")
        if logits is not None:
            self.test_acc(logits, y)
            self.test_confusion.update(logits, y)
            self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def test_iwae(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_k with ``iwae_k`` samples, in passes that stop at SIGTERM (a pass can take minutes)."""
        stop = (lambda: self.trainer.received_sigterm) if self._trainer is not None else None
        try:
            return importance_weighted(self.model, x, y, self.iwae_k, self.iwae_rows, stop)
        except Interrupted:
            raise SIGTERMException from None

    def on_test_epoch_start(self) -> None:
        if self.model.has_classifier:
            self.test_confusion.reset()

    def confusion_matrix(self) -> torch.Tensor | None:
        """The test confusion matrix (rows: true class, columns: argmax q(y|x)), gathered from
        every process; None for models without a classifier."""
        return self.test_confusion.compute().cpu() if self.model.has_classifier else None

    def log_terms(self, terms: dict[str, torch.Tensor], stage: str) -> None:
        """Log the mean of every per-example term under ``<stage>/``, averaged over the epoch;
        for 8-bit likelihoods every bound also in bits per dimension (``bpd``...)."""
        if not self.model.likelihood.binary:
            dims = math.prod(self.model.input_shape)
            for name in [n for n in terms if n.startswith(("elbo", "nll_iwae"))]:
                sign = 1 if name.startswith("elbo") else -1
                terms[name.replace("elbo", "bpd").replace("nll_iwae", "bpd_iwae")] = bits_per_dim(sign * terms[name], dims)
        self.log_dict(
            {f"{stage}/{name}": value.mean() for name, value in terms.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(next(iter(terms.values()))),
        )
