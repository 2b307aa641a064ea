"""Training entry point: ``python train.py [overrides]`` composes ``vaelab/conf/train.yaml``."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.data import ImageDataModule
from vaelab.lit import LitModel
from vaelab.metrics import summary
from vaelab.objectives import DataFacts
from vaelab.utils import CONFIG_DIR, apply_extras, instantiate_callbacks, instantiate_loggers, log_hyperparameters, run_log
from vaelab.utils.checkpoints import check_checkpoint, check_resumable, newest_readable, resume_model_config
from vaelab.utils.run import AtomicCheckpointIO, restart_checkpoint, run_directory, set_launch_rank, signal_exit_status

log = logging.getLogger(__name__)

# The datasets live in memory and are indexed by whole batches: loader workers only add overhead.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def finish_wandb() -> None:
    """Close the W&B run, if one was started, so the next job of a sweep starts a new one."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``, or for a cluster job that SLURM restarted its own ``last.ckpt``."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    last = restart_checkpoint(cfg.paths.output_dir)
    if last:
        log.info("Restarted job: resuming from %s", last)
    return last


def build(cfg: DictConfig, datamodule: ImageDataModule, **options) -> LitModel:
    """The model of ``cfg.model`` inside the LightningModule of ``cfg.lit``, trained by
    ``cfg.objective`` when the run trains (``cfg.train``), told the facts of the data it will see
    (binary pixels, the labeled share); ``options`` go to ``LitModel``."""
    model = hydra.utils.instantiate(cfg.model)
    # built from partials, so that a wrong setting raises its own message, not Hydra's wrapper
    objective = hydra.utils.instantiate(cfg.objective, _partial_=True)() if cfg.get("train") else None
    options.setdefault("model_config", OmegaConf.to_container(cfg.model, resolve=True))
    labeled = datamodule.labeled
    data = DataFacts(datamodule.binary, labeled, datamodule.train_size if labeled is not None else None)
    return hydra.utils.instantiate(cfg.lit, _partial_=True)(model=model, objective=objective, data=data, **options)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, then test the best checkpoint; return every logged metric, with
    ``optimized_metric`` at the best checkpoint's value. The run directory must be this run's
    alone (``run_directory``)."""
    set_launch_rank(cfg.trainer.get("devices"))
    ckpt_path = resume_path(cfg)
    with run_directory(cfg.paths.output_dir, ckpt_path), signal_exit_status(Path(cfg.paths.output_dir) / "checkpoints"):
        return _train(cfg, ckpt_path)


def _train(cfg: DictConfig, ckpt_path: str | None) -> dict[str, float]:
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.get("gradient_clip_val") or cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise ValueError(
            "vaelab steps the optimizer itself: set lit.gradient_clip_val and lit.accumulate_grad_batches "
            "instead of trainer.gradient_clip_val and trainer.accumulate_grad_batches."
        )
    if cfg.get("train") and 0 in (cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")):
        raise ValueError(
            "trainer.max_epochs=0 (or max_steps=0) trains nothing; set it to at least 1, or train=false to test a checkpoint only."
        )
    datamodule: ImageDataModule = hydra.utils.instantiate(cfg.data)
    if ckpt_path:
        resume_model_config(cfg, ckpt_path)
    model = build(cfg, datamodule)  # checks model, objective and data before anything runs
    if cfg.get("train") and not ckpt_path:
        for entry in (cfg.get("stages") or {}).values():  # what the model declares it needs first
            stage = hydra.utils.instantiate(entry, _recursive_=False)
            model = stage.run(cfg, model, datamodule, train, lambda c, **options: build(c, datamodule, **options))
    with open_dict(cfg):  # what the objective resolved, so the saved and logged config show it
        cfg.optimized_metric = cfg.get("optimized_metric") or f"val/{model.trained_bound}"
        if model.objective is not None:
            cfg.objective.update({k: v for k, v in model.objective.settings().items() if k in cfg.objective})
    if cfg.get("train") and cfg.optimized_metric.startswith("val/") and datamodule.val_size == 0:
        raise ValueError(
            f"data.val_size=0 leaves no validation set, but optimized_metric={cfg.optimized_metric} (which picks the "
            "best checkpoint) is measured on it: set data.val_size > 0 (the default holds out 10000)."
        )
    apply_extras(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, check_checkpoint(ckpt_path, model), model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), resume_from=ckpt_path)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    log_hyperparameters(cfg, model, loggers)

    metrics: dict[str, float] = {}
    try:
        if cfg.get("train"):
            fit(trainer, model, datamodule, ckpt_path)
            metrics.update(trainer.callback_metrics)
            kept = trainer.checkpoint_callback
            if kept is not None and kept.monitor == cfg.optimized_metric and kept.best_model_score is not None:
                metrics[cfg.optimized_metric] = kept.best_model_score  # what the kept checkpoint scored, not the last epoch
        if cfg.get("test"):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if cfg.get("train") and not best:
                log.warning("No best checkpoint was saved; testing the current weights.")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            metrics.update(trainer.callback_metrics)
    finally:
        finish_wandb()
    return {name: float(value) for name, value in metrics.items()}


def fit(trainer: pl.Trainer, model: LitModel, datamodule: ImageDataModule, ckpt_path: str | None) -> None:
    """``trainer.fit``; when training diverges, the error names the newest good checkpoint to resume from."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except FloatingPointError as error:
        directory = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        good = newest_readable(directory) if directory else None
        where = (f"The newest good checkpoint: {good}; resume with ckpt_path={good}." if good
                 else "No checkpoint was written before it.")
        raise FloatingPointError(f"{error} {where}") from None


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweep optimises; a clear error when it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}."
        )
    value = metrics[name]
    if not math.isfinite(value):
        log.warning("optimized_metric %s is %s.", name, value)
    return value


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with run_log():
        metrics = train(cfg)
    log.info("Metrics: %s", summary(metrics))
    return metric_value(metrics, cfg.optimized_metric) if cfg.get("train") else None


if __name__ == "__main__":
    main()
