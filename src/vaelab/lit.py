"""The one LightningModule: trains any ``vaelab.models`` model by its objective, logs its terms
and accuracy, and owns what is training rather than modelling (optimizer, gradient clipping and
accumulation, compilation, the finiteness guard, test-time importance sampling)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vaelab.elbo import bits_per_dim, dreg_surrogate, iwae_bound, marginal_kl
from vaelab.models.base import LatentModel
from vaelab.utils.checkpoint import upgrade_state_dict

log = logging.getLogger(__name__)

Optimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def model_name(model: LatentModel) -> str:
    """How the configs call a model: vae, cvae, ssvae (M2) or the model's own ``config_name``."""
    if getattr(model, "config_name", None):
        return model.config_name
    if model.has_classifier:
        return "ssvae"
    return "vae" if model.num_classes is None else "cvae"


OBJECTIVES = ("elbo", "iwae")
ESTIMATORS = ("standard", "dreg")


def check_objective(model: LatentModel, objective: str, k: int, estimator: str) -> None:
    """Refuse a training objective the model does not support, or options it would ignore."""
    if objective not in OBJECTIVES:
        raise ValueError(f"lit.objective={objective!r} must be one of {', '.join(OBJECTIVES)}.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"lit.estimator={estimator!r} must be one of {', '.join(ESTIMATORS)}.")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"lit.k must be a positive integer (importance samples per example), got {k}.")
    if objective == "elbo" and (k != 1 or estimator != "standard"):
        raise ValueError(f"lit.k={k} and lit.estimator={estimator} apply to lit.objective=iwae; set it, or leave them at 1 and standard.")
    posterior = getattr(model, "posterior", None)
    if estimator == "dreg" and posterior is not None and not posterior.is_gaussian:
        raise ValueError(f"lit.estimator=dreg needs the Gaussian posterior; posterior={posterior.type} has no stopped-parameter density here.")
    if objective == "iwae" and model.has_classifier:
        raise ValueError(
            "lit.objective=iwae trains the VAE and CVAE; M2's unlabeled bound sums over the classes and is "
            "trained as the ELBO (lit.objective=elbo). M2's importance-weighted bound is still measured at test time (eval.iwae_k)."
        )


LR_SCHEDULES = ("constant", "cosine", "step")


class LitModel(pl.LightningModule):
    """Trains ``model`` by maximising its bound:

    - plain batches (x, y): mean ELBO of the model (the CVAE's bound on log p(x|y) with the true y);
      or, with ``objective="iwae"``, the importance-weighted bound L_k with ``k`` samples
      (Burda et al. 2016), its gradient estimated as usual (``estimator="standard"``) or doubly
      reparameterized (``"dreg"``, Tucker et al. 2019), for the VAE and CVAE;
    - semi-supervised batches ``{"labeled": (x, y), "unlabeled": (x, -1)}`` for models with a
      classifier (M2), Kingma et al. 2014, eq. 9, from one batch of each part:
          w_lab mean_lab [L(x,y) - alpha CE(q(y|x), y)] + w_unlab mean_unlab U(x)
      with ``weighting="batch"`` w_lab = w_unlab = 1, or ``weighting="data"`` the parts'
      shares of the training set (the paper's sum per example), w_unlab further multiplied by
      ``unlabeled_weight`` (0: the supervised baseline, the same classifier trained on the labels
      alone; U(x) is then not computed). ``alpha=None`` takes the paper's alpha = 0.1 * N / N_lab,
      resolved from the data facts below. ``class_balance`` = lambda > 0 subtracts
      lambda KL(mean_unlab q(y|x) || p(y)) (``elbo.marginal_kl``), which penalises a classifier
      that gives some classes more than their share of the unlabeled batch.

    Facts about the data come from whoever builds the module (train.py), never from a datamodule:
    ``binary`` (pixels are {0, 1}), ``labeled`` (N_lab, or None when every label is used) and
    ``train_size`` (N). The update is stepped here (manual optimization: Lightning's automatic
    loop costs ~4 % of a small model's step), with ``gradient_clip_val`` (total norm) and
    ``accumulate_grad_batches`` as options; ``compile=True`` compiles ``objective``.
    ``lr_schedule="cosine"`` anneals every learning rate from its configured value to zero over
    the training budget (see ``budget_spent``); ``"step"`` multiplies it by ``lr_step["factor"]``
    every ``lr_step["epochs"]`` epochs, down to ``lr_step["lowest"]`` times its configured value
    (Maaloe et al.'s decay: 0.75 every 200 epochs, down to a tenth); ``"constant"`` keeps it.
    ``kl_warmup_steps`` > 0 weighs the KL term by beta = step / kl_warmup_steps until it reaches 1
    (deterministic warm-up, Sonderby et al. 2016), in every bound trained with the ELBO.
    ``iwae_k`` > 0 adds the k-sample importance-weighted bound to the test metrics, drawn in passes
    of at most ``iwae_rows`` decoder rows.
    """

    def __init__(
        self,
        model: LatentModel,
        optimizer: Optimizer | None = None,
        alpha: float | None = None,
        weighting: str = "batch",
        unlabeled_weight: float = 1.0,
        class_balance: float = 0.0,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        compile: bool = False,
        lr_schedule: str = "constant",
        lr_step: Mapping | None = None,
        objective: str = "elbo",
        k: int = 1,
        estimator: str = "standard",
        kl_warmup_steps: int = 0,
        iwae_k: int = 0,
        iwae_rows: int = 20_000,
        binary: bool | None = None,
        labeled: int | None = None,
        train_size: int | None = None,
    ) -> None:
        super().__init__()
        if alpha is not None and alpha < 0:
            raise ValueError(f"lit.alpha must be >= 0 (or null for the paper's scaling), got {alpha}.")
        if weighting not in ("batch", "data"):
            raise ValueError(f"lit.weighting={weighting!r} must be 'batch' or 'data'.")
        if not unlabeled_weight >= 0:
            raise ValueError(f"lit.unlabeled_weight must be >= 0, got {unlabeled_weight}.")
        if not class_balance >= 0:
            raise ValueError(f"lit.class_balance must be >= 0, got {class_balance}.")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"lit.gradient_clip_val must be positive or null, got {gradient_clip_val}.")
        if not (isinstance(accumulate_grad_batches, int) and accumulate_grad_batches >= 1):
            raise ValueError(f"lit.accumulate_grad_batches must be a positive integer, got {accumulate_grad_batches}.")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lit.lr_schedule={lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}.")
        lr_step = dict(lr_step or {"epochs": 200, "factor": 0.75, "lowest": 0.1})
        if not (isinstance(lr_step.get("epochs"), int) and lr_step["epochs"] >= 1 and 0 < lr_step.get("factor", 0) <= 1
                and 0 <= lr_step.get("lowest", -1) <= 1 and set(lr_step) == {"epochs", "factor", "lowest"}):
            raise ValueError(f"lit.lr_step must be {{epochs: a positive integer, factor: in (0, 1], lowest: in [0, 1]}}, got {lr_step}.")
        if not (isinstance(iwae_k, int) and iwae_k >= 0):
            raise ValueError(f"eval.iwae_k must be a non-negative integer, got {iwae_k}.")
        check_objective(model, objective, k, estimator)
        if not (isinstance(kl_warmup_steps, int) and kl_warmup_steps >= 0):
            raise ValueError(f"lit.kl_warmup_steps must be a non-negative integer (0: no warm-up), got {kl_warmup_steps}.")
        check_likelihood(model, binary)
        if optimizer is not None:
            try:  # the optimizer checks its settings when it is built: build one now, on a stand-in
                optimizer([torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError) as error:
                raise ValueError(f"lit.optimizer: {error}") from None
        self.model = model
        self.optimizer_factory = optimizer
        self.labeled, self.train_size = labeled, train_size
        self.labeled_share = labeled / train_size if labeled is not None and train_size else None
        if alpha is None and self.labeled_share is not None:
            alpha = 0.1 / self.labeled_share
        self.alpha, self.weighting, self.unlabeled_weight = alpha, weighting, unlabeled_weight
        self.class_balance = class_balance
        self.gradient_clip_val, self.accumulate_grad_batches = gradient_clip_val, accumulate_grad_batches
        self.compile_objective = compile
        self.lr_schedule, self.lr_step = lr_schedule, lr_step
        self.objective_name, self.k, self.estimator = objective, k, estimator
        self.kl_warmup_steps = kl_warmup_steps
        self._configured_groups: list[dict] = []  # the optimizer's settings as configured
        self._checkpoint_groups: list[dict] | None = None  # ... and as configured for a resumed run
        self.iwae_k, self.iwae_rows = iwae_k, iwae_rows
        self.automatic_optimization = False
        # resolved values (alpha) are saved, so checkpoints and loggers show what trained
        self.save_hyperparameters(
            {"model": model_name(model), "alpha": alpha, "weighting": weighting, "unlabeled_weight": unlabeled_weight,
             "class_balance": class_balance,
             "gradient_clip_val": gradient_clip_val, "lr_schedule": lr_schedule, "lr_step": lr_step, "objective": objective, "k": k,
             "estimator": estimator, "kl_warmup_steps": kl_warmup_steps,
             "accumulate_grad_batches": accumulate_grad_batches, "labeled": labeled, "train_size": train_size}
        )
        if model.has_classifier:
            self.val_acc = MulticlassAccuracy(model.num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(model.num_classes, average="micro")
            self.test_confusion = MulticlassConfusionMatrix(model.num_classes)  # rows: true class
        # a non-finite loss or gradient on an accelerator is found without waiting for the
        # device: its update is skipped there and the run stops at the next step that logs
        self._bad_step: torch.Tensor | None = None  # the first step with a non-finite loss
        self._bad_gradient_step: torch.Tensor | None = None  # ... with a finite loss and a non-finite gradient
        self._skip_update: torch.Tensor | None = None

    @property
    def bound_name(self) -> str:
        """What the model's validation bound is called: ``elbo`` (a bound on log p(x); U(x) for
        M2), or ``elbo_given_y`` for a conditional model without classifier (log p(x|y))."""
        conditional = self.model.num_classes is not None and not self.model.has_classifier
        return "elbo_given_y" if conditional else "elbo"

    @property
    def trained_bound(self) -> str:
        """The bound training maximises: ``bound_name``, or its ``iwae`` counterpart (L_k with
        ``k`` samples) for ``objective="iwae"``; validation logs it, and by default the best
        checkpoint is the one where it is highest."""
        return self.bound_name.replace("elbo", "iwae") if self.objective_name == "iwae" else self.bound_name

    # -- building ------------------------------------------------------------------------
    def configure_model(self) -> None:
        """With ``compile=True``, compile the training loss ``objective`` (networks, likelihood
        and bound, forward and backward) with ``torch.compile``; parameters keep their names,
        so checkpoints load with or without it."""
        if self.compile_objective and "objective" not in vars(self):
            self.objective = torch.compile(self.objective)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_training_data(self.model, self.labeled)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written when the LightningModule was the model itself load with renamed keys."""
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"], self.state_dict())
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
        groups = self.optimizers().param_groups
        before = self._checkpoint_groups or [dict(group) for group in groups]
        for group, configured, old in zip(groups, self._configured_groups, before):
            changed = [f"{k} {v} (checkpoint: {old[k]})" for k, v in configured.items() if k in old and old[k] != v]
            if changed:
                log.info("Resuming with the configured optimizer settings: %s.", ", ".join(changed))
            group.update(configured)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["configured_optimizer"] = self._configured_groups

    # -- the objective -------------------------------------------------------------------
    def objective(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on a training batch and the scalars to log with it."""
        if isinstance(batch, dict):
            return self.semi_supervised_objective(batch["labeled"], batch["unlabeled"])
        x, y = batch
        if self.objective_name == "iwae":
            return self.importance_weighted_objective(x, y)
        terms = self.model.bound(x, y)
        metrics = {name: value.mean() for name, value in terms.as_dict().items()}
        if self.kl_warmup_steps:
            metrics["kl_weight"] = torch.tensor(self.kl_weight())
            return -self.warmed(terms).mean(), metrics
        return -metrics[terms.name], metrics

    def importance_weighted_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Maximise L_k = log (1/k) sum_i w_i (Burda et al. 2016, eq. 8) over k samples drawn in
        one batched pass; logs L_k (``iwae``) and the ELBO estimated by the same samples (the mean
        of log w_i), so that runs with other objectives compare."""
        dreg = self.estimator == "dreg"
        log_w = self.model.log_weights(x, y, self.k, dreg=dreg)
        bound = iwae_bound(log_w)
        given_y = "_given_y" if self.model.num_classes is not None else ""
        metrics = {f"iwae{given_y}": bound.mean(), f"elbo{given_y}": log_w.mean()}
        return -(dreg_surrogate(log_w) if dreg else bound).mean(), metrics

    def kl_weight(self) -> float:
        """beta of the KL warm-up at this step: step / kl_warmup_steps, at most 1."""
        return min(1.0, self.global_step / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0

    def warmed(self, terms) -> torch.Tensor:
        """The bound with its KL term weighed by ``kl_weight``: elbo + (1 - beta) KL."""
        return terms.elbo + (1 - self.kl_weight()) * terms.kl

    def semi_supervised_objective(self, labeled, unlabeled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Kingma et al. 2014, eq. 9, with each part averaged over its batch (see the class)."""
        (x_lab, y_lab), (x_unlab, _) = labeled, unlabeled
        lab = self.model.bound(x_lab, y_lab)
        lab_bound = self.warmed(lab).mean()
        w_lab, w_unlab = (self.labeled_share, 1 - self.labeled_share) if self.weighting == "data" else (1, 1)
        if not self.unlabeled_weight:  # the supervised baseline
            ce = F.cross_entropy(self.model.classify(x_lab), y_lab)
            loss = -w_lab * (lab_bound - self.alpha * ce)
            return loss, {"loss": loss, "elbo_labeled": lab.elbo.mean(), "ce": ce}
        logits = self.model.classify(torch.cat([x_lab, x_unlab]))
        unlab = self.model.bound(x_unlab, qy_logits=logits[len(x_lab):])
        ce = F.cross_entropy(logits[: len(x_lab)], y_lab)
        loss = -(w_lab * (lab_bound - self.alpha * ce) + self.unlabeled_weight * w_unlab * self.warmed(unlab).mean())
        balance = marginal_kl(logits[len(x_lab):], -math.log(self.model.num_classes))  # uniform p(y)
        if self.class_balance:
            loss = loss + self.class_balance * balance
        metrics = {
            "loss": loss,
            "elbo": unlab.elbo.mean(),  # U(x) on the unlabeled batch
            "elbo_labeled": lab.elbo.mean(),  # L(x, y) on the labeled batch
            "recon": torch.cat([lab.recon, unlab.recon]).mean(),
            "kl": torch.cat([lab.kl, unlab.kl]).mean(),
            "ce": ce,
            "entropy": unlab.extras["entropy"].mean(),
            "marginal_kl": balance,
        }
        if self.kl_warmup_steps:
            metrics["kl_weight"] = torch.tensor(self.kl_weight())
        return loss, metrics

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.objective(batch)
        self._guard(loss, metrics)
        writes = self._loggers_write_this_step()
        if writes:
            self._raise_if_bad(metrics)
        optimizer = self.optimizers()
        self.manual_backward(loss / self.accumulate_grad_batches)
        if (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            metrics["lr"] = self._set_learning_rates(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if writes:
            bound = "elbo_given_y" if "elbo_given_y" in metrics else "elbo"  # the progress bar shows the bound
            for name, value in metrics.items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == bound)
        return loss

    def budget_spent(self) -> float:
        """The share of the training budget spent, in [0, 1]: optimizer steps over
        ``max_epochs``/``max_steps``, or elapsed over ``trainer.max_time``, whichever is further."""
        spent = [0.0]
        total = self.trainer.estimated_stepping_batches
        if math.isfinite(total) and total > 0:
            spent.append(self.global_step / total)
        for timer in (c for c in self.trainer.callbacks if isinstance(c, Timer)):
            remaining = timer.time_remaining()
            if remaining is not None:
                elapsed = timer.time_elapsed()
                spent.append(elapsed / max(elapsed + remaining, 1e-9))
        return min(1.0, max(spent))

    def lr_factor(self) -> float:
        """What ``lr_schedule`` multiplies every configured learning rate by at this step."""
        if self.lr_schedule == "cosine":  # Loshchilov & Hutter 2017, no restarts
            return 0.5 * (1 + math.cos(math.pi * self.budget_spent()))
        if self.lr_schedule == "step":
            return max(self.lr_step["factor"] ** (self.current_epoch // self.lr_step["epochs"]), self.lr_step["lowest"])
        return 1.0

    def _set_learning_rates(self, optimizer) -> float:
        """Set each parameter group's lr from its configured value and ``lr_schedule`` (so a
        resumed run follows the configuration, not the checkpoint's lr); return the first."""
        factor = self.lr_factor()
        for group, configured in zip(optimizer.param_groups, self._configured_groups):
            group["lr"] = configured["lr"] * factor
        return optimizer.param_groups[0]["lr"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are unscaled here under mixed precision: stop at a non-finite gradient of a
        finite loss (CPU) or record it and skip its update (accelerators), as ``_guard`` does for
        the loss; then clip."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:  # a finite loss can still have an overflowing gradient
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
            if self.reads_loss_every_step(bad):
                names = [name for name, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()] if bad else []
                if names:  # (an overflowing norm alone is not a non-finite gradient)
                    self._raise_non_finite_gradient(self.global_step, f", in {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}")
            else:
                if self._skip_update is not None:
                    bad = bad & ~self._skip_update  # a non-finite loss is recorded as such
                self._bad_gradient_step = self._record_bad(self._bad_gradient_step, bad)
        if self._skip_update is not None:
            for parameter in self.model.parameters():
                if parameter.grad is not None:
                    parameter.grad.masked_fill_(self._skip_update, 0)
            self._skip_update = None
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        self._raise_if_bad({})

    def _guard(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Stop at a non-finite loss before its update. On the CPU reading the loss costs
        nothing; on an accelerator that read would wait for the device every step, so there the
        first bad step is recorded on the device, the updates of bad steps are skipped, and the
        run stops when it next logs."""
        bad = ~torch.isfinite(loss)
        if self.reads_loss_every_step(loss):
            if bad:
                self._raise_non_finite(self.global_step, metrics)
            return
        self._bad_step = self._record_bad(self._bad_step, bad)

    def _record_bad(self, first: torch.Tensor | None, bad: torch.Tensor) -> torch.Tensor:
        """On the device, without reading it: skip this step's update if ``bad``, and return the
        first bad step recorded (``first``, -1 while there is none), now this one if it is the first."""
        self._skip_update = bad if self._skip_update is None else self._skip_update | bad
        if first is None:
            first = torch.full((), -1, device=bad.device)
        return torch.where((first < 0) & bad, self.global_step, first)

    def reads_loss_every_step(self, loss: torch.Tensor) -> bool:
        """Reading a CPU tensor costs nothing; reading an accelerator's waits for the device."""
        return loss.device.type == "cpu"

    def _raise_if_bad(self, metrics: dict[str, torch.Tensor]) -> None:
        if self._bad_step is not None and int(self._bad_step) >= 0:
            self._raise_non_finite(int(self._bad_step), metrics)
        if self._bad_gradient_step is not None and int(self._bad_gradient_step) >= 0:
            self._raise_non_finite_gradient(int(self._bad_gradient_step), "")

    def _raise_non_finite_gradient(self, step: int, where: str) -> None:
        raise FloatingPointError(
            f"Non-finite gradient at step {step} (epoch {self.current_epoch}) of a finite loss{where}. Training stopped "
            "without applying that step's update; checkpoints/last.ckpt holds finite weights. Lower lit.optimizer.lr or "
            "set lit.gradient_clip_val, then resume with ckpt_path=...last.ckpt."
        )

    def _raise_non_finite(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        values = ", ".join(f"train/{name}={float(value.detach()):.4g}" for name, value in metrics.items())
        bad = [f"train/{name}" for name, value in metrics.items() if not torch.isfinite(value).all()]
        raise FloatingPointError(
            f"Non-finite loss at step {step} (epoch {self.current_epoch}): "
            f"{', '.join(bad) or 'the loss'} went non-finite ({values}). Training stopped without "
            "applying that step's update; checkpoints/last.ckpt holds finite weights. Lower "
            "lit.optimizer.lr or set lit.gradient_clip_val, then resume with ckpt_path=...last.ckpt."
        )

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
        if self.trained_bound != self.bound_name:
            terms[self.trained_bound] = self.iwae(*batch, self.k)
        self.log_terms(terms, "val")
        if logits is not None:
            self.val_acc(logits, batch[1])
            self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        terms, logits = self.evaluation_terms(x, y)
        if self.iwae_k:
            terms[self.bound_name.replace("elbo", "nll_iwae")] = -self.iwae(x, y, self.iwae_k)
        self.log_terms(terms, "test")
        if logits is not None:
            self.test_acc(logits, y)
            self.test_confusion.update(logits, y)
            self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def on_test_epoch_start(self) -> None:
        if self.model.has_classifier:
            self.test_confusion.reset()

    def confusion_matrix(self) -> torch.Tensor | None:
        """The test confusion matrix (rows: true class, columns: argmax q(y|x)), gathered from
        every process; None for models without a classifier."""
        return self.test_confusion.compute().cpu() if self.model.has_classifier else None

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, y: torch.Tensor | None, k: int) -> torch.Tensor:
        """The k-sample importance-weighted bound per example, in passes of at most
        ``iwae_rows`` decoder rows."""
        weights = []
        for n in self.iwae_passes(len(x), k):
            if self._trainer is not None and self.trainer.received_sigterm:  # a pass can take minutes
                raise SIGTERMException
            weights.append(self.model.log_weights(x, y, n))
        return iwae_bound(torch.cat(weights))

    def iwae_passes(self, batch_size: int, k: int) -> list[int]:
        """Importance samples per pass for a batch: at most ``iwae_rows`` decoder rows each."""
        per_pass = max(1, self.iwae_rows // (batch_size * self.model.rows_per_sample))
        return [min(per_pass, k - start) for start in range(0, k, per_pass)]

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


def class_information(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much q(y|x) says about the class, per example: ``kl_y`` = KL(q(y|x) || p(y)) =
    log K - H(q(y|x)) for the uniform p(y) (the y part of the KL, beside z's ``kl``), and ``mi``,
    the mutual information I(x; y) = H(E_x q(y|x)) - E_x H(q(y|x)) under q, estimated on the
    batch (the same value for each of its examples). mi near 0: the classifier's answers do not
    depend on the image; near log K: confident and spread evenly over the classes."""
    log_q = logits.log_softmax(-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    marginal = log_q.exp().mean(0)
    mi = -(marginal * marginal.clamp_min(1e-12).log()).sum() - entropy.mean()
    return {"kl_y": math.log(logits.shape[-1]) - entropy, "mi": mi.expand(len(logits))}


def check_likelihood(model: LatentModel, binary: bool | None) -> None:
    """The likelihood must suit the pixels: binary for Bernoulli, 8-bit for the discretized ones."""
    if binary is not None and model.likelihood.continuous:
        raise ValueError(
            "likelihood=normal is a density on real values (M1+M2's features), not a probability of pixels; "
            "use likelihood=bernoulli for binarized images, logistic or gaussian for 8-bit ones."
        )
    if binary is None or binary == model.likelihood.binary:
        return
    if model.likelihood.binary:
        raise ValueError(
            "likelihood=bernoulli models binary pixels, but the data give 8-bit ones; use "
            "likelihood=logistic (or gaussian), or binarize the data (data.binarize=true on MNIST)."
        )
    raise ValueError(
        f"likelihood={model.likelihood.type} models 8-bit pixels, but the data are binarized; "
        "set data.binarize=false, or use likelihood=bernoulli."
    )


def check_training_data(model: LatentModel, labeled: int | None) -> None:
    """Models with a classifier train on a labeled/unlabeled split, the others on plain batches."""
    if model.has_classifier and labeled is None:
        raise ValueError(
            f"model={model_name(model)} learns from a few labels and many unlabeled examples: set "
            "data.labeled=N (a multiple of the number of classes, e.g. data.labeled=100)."
        )
    if not model.has_classifier and labeled is not None:
        name = model_name(model).upper()
        raise ValueError(
            f"{name} trains on plain batches, but data.labeled={labeled} split the training set into "
            "labeled and unlabeled parts; use data.labeled=null (or model=ssvae for semi-supervised training)."
        )
