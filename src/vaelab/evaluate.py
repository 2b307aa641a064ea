"""Evaluation entry point: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``.

Restores the model and data of the checkpoint's run, tests it (ELBO, the importance-weighted
bound with ``eval.iwae_k`` samples, bits/dim for 8-bit likelihoods, accuracy and confusion matrix
for classifiers), scores class-conditional samples with an independent classifier, draws the
figures, and writes everything to ``metrics.json`` and ``figures/`` in its own run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vaelab.callbacks.images import save_figures
from vaelab.classifier import load_classifier, real_image_data, sample_accuracy
from vaelab.train import finish_wandb
from vaelab.utils import CONFIG_DIR, apply_extras, check_checkpoint, instantiate_loggers, log_hyperparameters, restore_run_config
from vaelab.viz import confusion_plot, latent_codes, latent_scatter, model_figures

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Test ``cfg.ckpt_path`` and return every metric; ``overrides`` are the command line's,
    which win over the restored run config."""
    if not cfg.get("ckpt_path"):
        raise ValueError("Give the checkpoint to evaluate: python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt")
    cfg = restore_run_config(cfg, overrides or [])
    apply_extras(cfg)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    check_checkpoint(cfg.ckpt_path, model)
    model.iwae_k, model.iwae_rows = cfg.eval.iwae_k, cfg.eval.iwae_rows
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers)
    log_hyperparameters(cfg, model, loggers)
    try:
        trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        # every process takes part in gathering the confusion matrix; rank 0 reports it
        confusion = getattr(model, "test_confusion", None)
        matrix = confusion.compute().cpu() if confusion is not None else None
        if trainer.is_global_zero:
            report = extras(cfg, model, datamodule, metrics, loggers, matrix)
            write_report(cfg, model, metrics, report)
    finally:
        finish_wandb()
    return metrics


def extras(cfg: DictConfig, model, datamodule, metrics: dict[str, float], loggers, matrix: torch.Tensor | None) -> dict:
    """Figures, the confusion matrix and sample quality; adds scalar results to ``metrics`` and
    returns the rest for the report."""
    report: dict = {}
    model.eval()
    x, y = datamodule.example_batch(max(cfg.eval.n_examples, cfg.eval.n_latent), split="test")
    n = cfg.eval.n_examples
    figures = model_figures(model, x[:n].to(model.device), y[:n].to(model.device))
    x, y = x[: cfg.eval.n_latent], y[: cfg.eval.n_latent]
    codes = torch.cat([latent_codes(model, a.to(model.device), b.to(model.device)) for a, b in zip(x.split(500), y.split(500))])
    figures["latent"] = latent_scatter(codes, y, datamodule.num_classes)
    if matrix is not None:
        report["confusion_matrix"] = matrix.tolist()
        figures["confusion"] = confusion_plot(matrix)
    if cfg.eval.sample_quality and getattr(model, "num_classes", None):
        path = Path(cfg.eval.classifier_dir) / f"{datamodule.name}.pt"
        classifier, real_accuracy = load_classifier(path, real_image_data(cfg.data), cfg.eval.classifier_epochs)
        shares = sample_accuracy(model, classifier, cfg.eval.samples_per_class)
        metrics["test/sample_acc"] = float(shares.mean())
        report["sample_acc_per_class"] = shares.tolist()
        report["classifier"] = {"path": str(path), "test_acc_on_real_images": real_accuracy}
        for logger in loggers:
            logger.log_metrics({"test/sample_acc": metrics["test/sample_acc"]}, step=0)
    save_figures(figures, Path(cfg.paths.output_dir) / "figures", loggers, step=0)
    return report


def write_report(cfg: DictConfig, model, metrics: dict[str, float], report: dict) -> None:
    """``metrics.json``: the metrics and what they were measured on."""
    binarized = getattr(cfg.data, "binarize", False)
    result = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "model": type(model).__name__,
        "likelihood": repr(model.likelihood),
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "test_inputs": f"binarized once with seed data.split_seed={cfg.data.split_seed}" if binarized else "8-bit pixels",
        "iwae_k": cfg.eval.iwae_k,
        "units": "nats per example (elbo, nll_iwae), bits per dimension (bpd)",
        "metrics": dict(sorted(metrics.items())),
        **report,
    }
    path = Path(cfg.paths.output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("Wrote %s", path)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
