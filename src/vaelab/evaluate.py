"""Evaluation entry point: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``.

Restores the model and data of the checkpoint's run, tests it (ELBO, the importance-weighted
bound with ``eval.iwae_k`` samples, bits/dim for 8-bit likelihoods, accuracy and confusion matrix
for classifiers), scores class-conditional samples with an independent classifier, draws the
figures, and writes everything to ``metrics.json`` and ``figures/`` in its own run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vaelab.classifier import classifier_file, load_classifier, real_image_data, sample_accuracy
from vaelab.data import ImageDataModule
from vaelab.iwae import passes
from vaelab.lit import LitModel
from vaelab.metrics import summary
from vaelab.models.base import LatentModel
from vaelab.objectives import model_kind
from vaelab.report import latent_codes, model_figures, save_figures
from vaelab.train import build, finish_wandb
from vaelab.utils import CONFIG_DIR, apply_extras, instantiate_loggers, log_hyperparameters, run_log
from vaelab.utils.checkpoints import check_checkpoint, complete_model_config, restore_run_config
from vaelab.utils.run import atomic_write, run_directory, set_launch_rank, signal_exit_status
from vaelab.viz import confusion_plot, latent_scatter

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Test ``cfg.ckpt_path`` and return every metric; ``overrides`` are the command line's,
    which win over the restored run config. The run directory must be this run's alone."""
    if not cfg.get("ckpt_path"):
        raise ValueError("Give the checkpoint to evaluate: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt")
    set_launch_rank(cfg.trainer.get("devices"))
    with run_directory(cfg.paths.output_dir), signal_exit_status():
        return _evaluate(restore_run_config(cfg, overrides or []))


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    check_eval_settings(cfg.eval)
    apply_extras(cfg)
    datamodule: ImageDataModule = hydra.utils.instantiate(cfg.data)
    complete_model_config(cfg, cfg.ckpt_path)
    module = build(cfg, datamodule, iwae_k=cfg.eval.iwae_k, iwae_rows=cfg.eval.iwae_rows)
    check_checkpoint(cfg.ckpt_path, module)
    if cfg.eval.iwae_k:
        log.info("IWAE bound with k = %d: %s", cfg.eval.iwae_k, iwae_cost(module, cfg.eval.iwae_k, datamodule))
    classifier = classifier_path(cfg, datamodule) if cfg.eval.sample_quality and module.model.num_classes else None
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers)
    log_hyperparameters(cfg, module, loggers)
    try:
        trainer.test(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        matrix = module.confusion_matrix()  # every process takes part in gathering it
        if trainer.is_global_zero:
            report = {} if matrix is None else {"confusion_matrix": matrix.tolist()}
            write_report(cfg, module.model, metrics, report)  # first the test, then what takes longer
            refuse_non_finite(metrics, cfg.ckpt_path)
            figures = evaluation_figures(cfg, module.model, datamodule)
            if matrix is not None:
                figures["confusion"] = confusion_plot(matrix)
            if classifier is not None:
                report.update(sample_quality(cfg, module.model, classifier, datamodule, metrics, loggers))
                write_report(cfg, module.model, metrics, report)
            save_figures(figures, Path(cfg.paths.output_dir) / "figures", loggers, step=0)
    finally:
        finish_wandb()
    return metrics


def check_eval_settings(settings: DictConfig) -> None:
    """One clear error for an evaluation setting that cannot work, before anything runs."""
    for name in ("iwae_rows", "n_examples", "n_latent", "samples_per_class", "classifier_epochs"):
        value = settings[name]
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"eval.{name} must be a positive integer, got {value}.")
    if not 0 <= settings.classifier_min_acc <= 1:
        raise ValueError(f"eval.classifier_min_acc must be a share in [0, 1], got {settings.classifier_min_acc}.")


def refuse_non_finite(metrics: dict[str, float], checkpoint: str) -> None:
    """A result that is not a number is no result: raise, naming the metrics and the checkpoint."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise FloatingPointError(
            f"{', '.join(f'{name}={metrics[name]}' for name in bad)}: the checkpoint {checkpoint} gives results that are not "
            "numbers (its weights diverged). Evaluate an earlier checkpoint of the run (checkpoints/epoch_NNN.ckpt)."
        )


def classifier_path(cfg: DictConfig, datamodule: ImageDataModule) -> Path:
    """Where the sample-quality classifier is cached: ``eval.classifier_dir``, or, when it has
    none yet and cannot be written, the run directory (checked before anything is computed)."""
    path = classifier_file(cfg.eval.classifier_dir, datamodule, cfg.eval.classifier_epochs)
    if path.is_file() or writable(path.parent):
        return path
    fallback = Path(cfg.paths.output_dir) / "classifiers" / path.name
    log.warning("eval.classifier_dir=%s cannot be written; caching the classifier at %s instead.", path.parent, fallback)
    return fallback


def writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (made if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def iwae_cost(module: LitModel, k: int, datamodule: ImageDataModule) -> str:
    """What the importance-weighted bound will cost: decoder rows and forward passes over the test set."""
    datamodule.setup("test")
    images, batch, per_image = len(datamodule.test_set), datamodule.eval_batch_size, module.model.rows_per_sample
    count = len(passes(min(batch, images), k, per_image, module.iwae_rows)) * -(-images // batch)
    return f"{k * images * per_image:.3g} decoder rows (k x {images} test images x {per_image}) in {count} passes"


@torch.no_grad()
def evaluation_figures(cfg: DictConfig, model: LatentModel, datamodule: ImageDataModule) -> dict[str, torch.Tensor]:
    """The model's figures on the first test images, and the latent scatter of ``eval.n_latent`` of them."""
    model.eval()
    x, y = datamodule.example_batch(max(cfg.eval.n_examples, cfg.eval.n_latent), split="test")
    n = cfg.eval.n_examples
    figures = model_figures(model, x[:n].to(model.device), y[:n].to(model.device))
    x, y = x[: cfg.eval.n_latent], y[: cfg.eval.n_latent]
    codes = torch.cat([latent_codes(model, a.to(model.device), b.to(model.device)) for a, b in zip(x.split(500), y.split(500))])
    figures["latent"] = latent_scatter(codes, y, datamodule.num_classes)
    return figures


def sample_quality(cfg: DictConfig, model: LatentModel, path: Path, datamodule: ImageDataModule, metrics: dict[str, float], loggers) -> dict:
    """``test/sample_acc``: the share of class-conditional samples that an independent classifier
    (cached at ``path``, built on first use) assigns to their class; adds it to ``metrics`` and
    the loggers and returns the per-class shares and the classifier's own accuracy for the report."""
    classifier, real_accuracy = load_classifier(path, real_image_data(cfg.data), cfg.eval.classifier_epochs, cfg.eval.classifier_min_acc)
    shares = sample_accuracy(model, classifier, cfg.eval.samples_per_class)
    metrics["test/sample_acc"] = float(shares.mean())
    metrics["test/sample_classifier_acc"] = real_accuracy  # the judge's own accuracy on real test images
    for logger in loggers:
        logger.log_metrics({name: metrics[name] for name in ("test/sample_acc", "test/sample_classifier_acc")}, step=0)
    return {"sample_acc_per_class": shares.tolist(), "classifier": {"path": str(path), "test_acc_on_real_images": real_accuracy}}


def write_report(cfg: DictConfig, model, metrics: dict[str, float], report: dict) -> None:
    """``metrics.json``: the metrics and what they were measured on."""
    binarized = getattr(cfg.data, "binarize", False)
    result = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "model": model_kind(model),
        "likelihood": model.likelihood_description,
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "test_inputs": f"binarized once with seed data.split_seed={cfg.data.split_seed}" if binarized else "8-bit pixels",
        "iwae_k": cfg.eval.iwae_k,
        "units": "nats per example (elbo, nll_iwae), bits per dimension (bpd)",
        # standard JSON: a value that is not a number is written as null
        "metrics": {name: value if math.isfinite(value) else None for name, value in sorted(metrics.items())},
        **report,
    }
    path = Path(cfg.paths.output_dir) / "metrics.json"
    with atomic_write(path) as file:
        file.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
    log.info("Wrote %s", path)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with run_log():
        metrics = evaluate(cfg, list(HydraConfig.get().overrides.task))
    log.info("Metrics: %s", summary(metrics))


if __name__ == "__main__":
    main()
