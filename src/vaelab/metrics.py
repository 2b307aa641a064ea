"""Which way is better for each logged metric: checkpoints keep the best epoch and sweeps
search in that direction (``optimized_metric``). Names are the part after ``train/``, ``val/``
or ``test/``. Also the line of final metrics that train.py and evaluate.py write to their log."""

from __future__ import annotations

HIGHER_IS_BETTER = {"elbo", "elbo_given_y", "elbo_labeled", "iwae", "iwae_given_y", "acc", "sample_acc", "sample_classifier_acc", "mi"}
LOWER_IS_BETTER = {
    "loss", "ce", "nll_iwae", "nll_iwae_given_y", "bpd", "bpd_given_y", "bpd_iwae", "bpd_iwae_given_y",
}


def metric_mode(name: str | None) -> str:
    """``max`` or ``min`` for ``name`` (e.g. ``val/bpd``: min); ``None`` stands for the model's
    validation bound, an ELBO: max. Unknown names raise, listing the known ones."""
    if name is None:
        return "max"
    metric = name.rsplit("/", 1)[-1]
    if metric in HIGHER_IS_BETTER:
        return "max"
    if metric in LOWER_IS_BETTER:
        return "min"
    raise ValueError(
        f"optimized_metric={name!r} has no declared direction; choose one of "
        f"{', '.join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))} (after val/ or test/)."
    )


def metric_direction(name: str | None) -> str:
    """``maximize`` or ``minimize``, as sweepers (Optuna, W&B) spell ``metric_mode``."""
    return f"{metric_mode(name)}imize"


def summary(metrics: dict[str, float]) -> str:
    """The metrics as one line of the run's log: ``name=value, ...`` in name order."""
    return ", ".join(f"{name}={value:.6g}" for name, value in sorted(metrics.items()))
