"""Training objectives: objects that turn a model and a training batch into the loss to minimise
and the named terms to log, as Pyro separates ``Trace_ELBO`` / ``RenyiELBO`` from the model.

Each objective checks its own settings, says which models and data it takes (one clear error
otherwise) and names the bound it trains; ``objective=elbo|iwae|semisupervised`` chooses one
(``conf/objective/``). A new objective is one class here and one yaml there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaelab.elbo import dreg_surrogate, iwae_bound, marginal_kl
from vaelab.iwae import importance_weighted
from vaelab.models.base import LatentModel, Terms

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DataFacts:
    """What the entry point tells the training about its data (never read from a datamodule):
    ``binary`` pixels in {0, 1}, ``labeled`` (N_lab, None when every label is used) and
    ``train_size`` (N)."""

    binary: bool | None = None
    labeled: int | None = None
    train_size: int | None = None

    @property
    def labeled_share(self) -> float | None:
        return self.labeled / self.train_size if self.labeled is not None and self.train_size else None

    def check_likelihood(self, model: LatentModel) -> None:
        """The likelihood must suit the pixels: binary for Bernoulli, 8-bit for the discretized ones."""
        likelihood = model.likelihood
        if self.binary is not None and likelihood.continuous:
            raise ValueError(
                "likelihood=normal is a density on real values (M1+M2's features), not a probability of pixels; "
                "use likelihood=bernoulli for binarized images, logistic or gaussian for 8-bit ones."
            )
        if self.binary is None or self.binary == likelihood.binary:
            return
        if likelihood.binary:
            raise ValueError(
                "likelihood=bernoulli models binary pixels, but the data give 8-bit ones; use "
                "likelihood=logistic (or gaussian), or binarize the data (data.binarize=true on MNIST)."
            )
        raise ValueError(
            f"likelihood={likelihood.type} models 8-bit pixels, but the data are binarized; "
            "set data.binarize=false, or use likelihood=bernoulli."
        )


def random_shift(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate each image of an (N, C, H, W) batch by its own random offset (dy, dx), uniform
    on {-pixels, ..., pixels}^2, repeating the edge pixels into the space it uncovers."""
    if not pixels:
        return images
    if images.dim() != 4:
        raise ValueError(f"objective.labeled_shift translates image batches of shape (N, C, H, W), got {tuple(images.shape)}.")
    n, c, h, w = images.shape
    if pixels >= min(h, w):
        raise ValueError(f"objective.labeled_shift={pixels} moves {h}x{w} images off their own frame; use fewer pixels (e.g. 2).")
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    return padded[batch, torch.arange(c, device=images.device)[None, :, None, None], rows, cols]


def random_rotation(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate each image of an (N, C, H, W) batch about its centre by its own random angle, uniform
    on [-degrees, degrees], taking each new pixel from its nearest source pixel (binary images stay
    binary) and repeating the edge pixels where the source falls outside the frame."""
    if not degrees:
        return images
    if images.dim() != 4:
        raise ValueError(f"objective.labeled_rotation rotates image batches of shape (N, C, H, W), got {tuple(images.shape)}.")
    angle = torch.deg2rad((2 * torch.rand(len(images), device=images.device) - 1) * degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


def model_kind(model: LatentModel) -> str:
    """The model in words, for messages: its class, and whether it is conditional."""
    conditional = model.num_classes is not None and not model.has_classifier
    return f"{type(model).__name__}{' (conditional)' if conditional else ''}"


class Objective(ABC):
    """The loss of a training batch. ``check`` refuses a model or data the objective cannot
    train; ``trained_bound`` names the bound it maximises (validation logs it, and by default
    the best checkpoint is the one where it is highest); ``validation_terms`` adds what
    validation must measure beyond the model's own bound."""

    name: str

    def check(self, model: LatentModel, data: DataFacts) -> None:
        """Plain batches (x, y): models without a classifier, data without a labeled split."""
        if model.has_classifier:
            raise ValueError(
                f"objective={self.name} trains models without a classifier; {model_kind(model)} learns from a few labels "
                "and many unlabeled examples: use objective=semisupervised (model=ssvae, adgm, sdgm and m1m2 choose it)."
            )
        if data.labeled is not None:
            raise ValueError(
                f"{model_kind(model)} trains on plain batches, but data.labeled={data.labeled} split the training set into "
                "labeled and unlabeled parts; use data.labeled=null (or model=ssvae for semi-supervised training)."
            )

    @abstractmethod
    def __call__(self, model: LatentModel, batch, step: int) -> tuple[torch.Tensor, Metrics]:
        """The loss to minimise on ``batch`` at optimizer step ``step``, and the scalars to log."""

    def trained_bound(self, model: LatentModel) -> str:
        return model.bound_name

    def validation_terms(self, model: LatentModel, x: torch.Tensor, y: torch.Tensor) -> Metrics:
        """Per-example terms that validation logs beside the model's bound (none by default)."""
        return {}

    def settings(self) -> dict:
        """The objective's resolved settings, for checkpoints and loggers."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class KLWarmup:
    """Deterministic KL warm-up (Sonderby et al. 2016): the KL term weighed by
    beta = step / ``kl_warmup_steps`` until it reaches 1 (0: no warm-up)."""

    def __init__(self, kl_warmup_steps: int = 0) -> None:
        if not (isinstance(kl_warmup_steps, int) and kl_warmup_steps >= 0):
            raise ValueError(f"objective.kl_warmup_steps must be a non-negative integer (0: no warm-up), got {kl_warmup_steps}.")
        self.kl_warmup_steps = kl_warmup_steps

    def kl_weight(self, step: int) -> float:
        """beta at optimizer step ``step``."""
        return min(1.0, step / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0

    def warmed(self, terms: Terms, step: int) -> torch.Tensor:
        """The bound with its KL term weighed by beta: elbo + (1 - beta) KL, per example."""
        return terms.elbo + (1 - self.kl_weight(step)) * terms.kl if self.kl_warmup_steps else terms.elbo


class ELBO(KLWarmup, Objective):
    """Maximise the mean ELBO of plain batches (the CVAE's bound on log p(x|y) with the true y)."""

    name = "elbo"

    def __call__(self, model: LatentModel, batch, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = batch
        terms = model.bound(x, y)
        metrics = {name: value.mean() for name, value in terms.as_dict().items()}
        if self.kl_warmup_steps:
            metrics["kl_weight"] = torch.tensor(self.kl_weight(step))
        return -self.warmed(terms, step).mean(), metrics


ESTIMATORS = ("standard", "dreg")


class IWAE(Objective):
    """Maximise the importance-weighted bound L_k = log (1/k) sum_i w_i (Burda et al. 2016, eq. 8)
    over ``k`` samples drawn in one batched pass, its gradient estimated as usual
    (``estimator="standard"``) or doubly reparameterized (``"dreg"``, Tucker et al. 2019). Logs
    L_k (``iwae``) and the ELBO estimated by the same samples (the mean of log w_i), so that
    runs with other objectives compare; validation measures L_k too."""

    name = "iwae"

    def __init__(self, k: int = 5, estimator: str = "standard") -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"objective.k must be a positive integer (importance samples per example), got {k}.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"objective.estimator={estimator!r} must be one of {', '.join(ESTIMATORS)}.")
        self.k, self.estimator = k, estimator

    def check(self, model: LatentModel, data: DataFacts) -> None:
        if model.has_classifier:
            raise ValueError(
                "objective=iwae trains the VAE and CVAE; a semi-supervised model's unlabeled bound sums over the classes and "
                "is trained with objective=semisupervised. Its importance-weighted bound is still measured at test time (eval.iwae_k)."
            )
        super().check(model, data)
        if self.estimator == "dreg" and not model.supports_dreg:
            raise ValueError(
                f"objective.estimator=dreg needs the Gaussian posterior (posterior=gaussian): {model_kind(model)}'s q(z|x) has no "
                "stopped-parameter density here."
            )

    def trained_bound(self, model: LatentModel) -> str:
        return model.bound_name.replace("elbo", "iwae")

    def __call__(self, model: LatentModel, batch, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = batch
        dreg = self.estimator == "dreg"
        log_w = model.log_weights(x, y, self.k, dreg=dreg)
        bound = iwae_bound(log_w)
        metrics = {self.trained_bound(model): bound.mean(), model.bound_name: log_w.mean()}
        return -(dreg_surrogate(log_w) if dreg else bound).mean(), metrics

    def validation_terms(self, model: LatentModel, x: torch.Tensor, y: torch.Tensor) -> Metrics:
        return {self.trained_bound(model): importance_weighted(model, x, y, self.k)}


class SemiSupervised(KLWarmup, Objective):
    """Kingma et al. 2014, eq. 9, for models with a classifier, from one batch of each part
    ``{"labeled": (x, y), "unlabeled": (x, -1)}``:

        loss = -(w_lab mean_lab [L(x,y) - alpha CE(q(y|x), y)] + w_unlab mean_unlab U(x))
               + lambda KL(mean_unlab q(y|x) || p(y))

    ``weighting="batch"``: w_lab = w_unlab = 1; ``"data"``: the parts' shares of the training set
    (the paper's sum per example). w_unlab is further multiplied by ``unlabeled_weight`` (0: the
    supervised baseline, the same classifier trained on the labels alone; U(x) is then not
    computed). ``alpha=None`` takes the paper's alpha = 0.1 * N / N_lab, resolved by ``check``
    from the data. ``class_balance`` = lambda > 0 penalises a classifier that gives some classes
    more than their share of the unlabeled batch (``elbo.marginal_kl``). ``kl_warmup_steps`` as
    in ``ELBO``, in both bounds. ``labeled_shift`` = s > 0 translates every labeled image by a
    fresh random offset of up to s pixels each step (``random_shift``), in L(x,y) and CE alike:
    the labels are few, their translations many; ``labeled_rotation`` = d > 0 then turns each by
    a fresh random angle of up to d degrees (``random_rotation``). Unlabeled images and evaluation
    are untouched."""

    name = "semisupervised"

    def __init__(
        self,
        alpha: float | None = None,
        weighting: str = "batch",
        unlabeled_weight: float = 1.0,
        class_balance: float = 0.0,
        kl_warmup_steps: int = 0,
        labeled_shift: int = 0,
        labeled_rotation: float = 0.0,
    ) -> None:
        super().__init__(kl_warmup_steps)
        if alpha is not None and not alpha >= 0:
            raise ValueError(f"objective.alpha must be >= 0 (or null for the paper's scaling), got {alpha}.")
        if weighting not in ("batch", "data"):
            raise ValueError(f"objective.weighting={weighting!r} must be 'batch' or 'data'.")
        if not unlabeled_weight >= 0:
            raise ValueError(f"objective.unlabeled_weight must be >= 0, got {unlabeled_weight}.")
        if not class_balance >= 0:
            raise ValueError(f"objective.class_balance must be >= 0, got {class_balance}.")
        if isinstance(labeled_shift, bool) or not isinstance(labeled_shift, int) or labeled_shift < 0:
            raise ValueError(f"objective.labeled_shift must be a whole number of pixels >= 0 (0: off), got {labeled_shift!r}.")
        if isinstance(labeled_rotation, bool) or not isinstance(labeled_rotation, (int, float)) or not 0 <= labeled_rotation <= 180:
            raise ValueError(f"objective.labeled_rotation must be an angle in degrees in [0, 180] (0: off), got {labeled_rotation!r}.")
        self.labeled_shift, self.labeled_rotation = labeled_shift, labeled_rotation
        self._alpha = alpha  # as configured; ``alpha`` as resolved by ``check``
        self.alpha, self.weighting, self.unlabeled_weight, self.class_balance = alpha, weighting, unlabeled_weight, class_balance
        self.labeled_share: float | None = None

    def check(self, model: LatentModel, data: DataFacts) -> None:
        """Take a model with a classifier and a labeled split; resolve alpha and the parts' weights."""
        if not model.has_classifier:
            raise ValueError(
                f"objective=semisupervised trains models with a classifier q(y|x) (model=ssvae, adgm, sdgm, m1m2); "
                f"{model_kind(model)} has none: use objective=elbo."
            )
        if data.labeled is None:
            raise ValueError(
                f"{model_kind(model)} learns from a few labels and many unlabeled examples: set "
                "data.labeled=N (a multiple of the number of classes, e.g. data.labeled=100)."
            )
        self.labeled_share = data.labeled_share
        if self.labeled_share is None and (self._alpha is None or self.weighting == "data"):
            raise ValueError(
                "objective.alpha=null and objective.weighting=data need the training set's size (DataFacts.train_size) "
                "beside data.labeled; train.py hands both in."
            )
        self.alpha = 0.1 / self.labeled_share if self._alpha is None else self._alpha

    def __call__(self, model: LatentModel, batch, step: int) -> tuple[torch.Tensor, Metrics]:
        (x_lab, y_lab), (x_unlab, _) = batch["labeled"], batch["unlabeled"]
        x_lab = random_rotation(random_shift(x_lab, self.labeled_shift), self.labeled_rotation)
        lab = model.bound(x_lab, y_lab)
        lab_bound = self.warmed(lab, step).mean()
        w_lab, w_unlab = (self.labeled_share, 1 - self.labeled_share) if self.weighting == "data" else (1, 1)
        if not self.unlabeled_weight:  # the supervised baseline
            ce = F.cross_entropy(model.classify(x_lab), y_lab)
            loss = -w_lab * (lab_bound - self.alpha * ce)
            return loss, {"loss": loss, "elbo_labeled": lab.elbo.mean(), "ce": ce}
        logits = model.classify(torch.cat([x_lab, x_unlab]))
        unlab = model.bound(x_unlab, qy_logits=logits[len(x_lab):])
        ce = F.cross_entropy(logits[: len(x_lab)], y_lab)
        loss = -(w_lab * (lab_bound - self.alpha * ce) + self.unlabeled_weight * w_unlab * self.warmed(unlab, step).mean())
        balance = marginal_kl(logits[len(x_lab):], -math.log(model.num_classes))  # uniform p(y)
        if self.class_balance:
            loss = loss + self.class_balance * balance
        metrics = {
            "loss": loss,
            model.bound_name: unlab.elbo.mean(),  # U(x) on the unlabeled batch
            "elbo_labeled": lab.elbo.mean(),  # L(x, y) on the labeled batch
            "recon": torch.cat([lab.recon, unlab.recon]).mean(),
            "kl": torch.cat([lab.kl, unlab.kl]).mean(),
            "ce": ce,
            "entropy": unlab.extras["entropy"].mean(),
            "marginal_kl": balance,
        }
        if self.kl_warmup_steps:
            metrics["kl_weight"] = torch.tensor(self.kl_weight(step))
        return loss, metrics
