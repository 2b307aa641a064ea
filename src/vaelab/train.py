"""Training entry point: ``python train.py [overrides]`` composes ``vaelab/conf/train.yaml``."""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.data import ImageDataModule
from vaelab.lit import LitModel, check_training_data
from vaelab.models.m1m2 import ACTIVE_SPREAD, M1_SETTINGS, M1M2, active_count, feature_spread
from vaelab.utils import (
    CONFIG_DIR,
    apply_extras,
    check_checkpoint,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
)
from vaelab.utils.checkpoint import settings_from_checkpoint
from vaelab.utils.run import AtomicCheckpointIO, restart_checkpoint, run_directory, signal_exit_status

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
    """The model of ``cfg.model`` inside the LightningModule of ``cfg.lit``, told the facts of
    the data it will see (binary pixels, the labeled share); ``options`` go to ``LitModel``."""
    model = hydra.utils.instantiate(cfg.model)
    facts = {"binary": datamodule.binary, "labeled": datamodule.labeled}
    if datamodule.labeled is not None:
        facts["train_size"] = datamodule.train_size
    # built from a partial, so that a wrong setting raises its own message, not Hydra's wrapper
    return hydra.utils.instantiate(cfg.lit, _partial_=True)(model=model, **facts, **options)


def train_m1(cfg: DictConfig) -> str | None:
    """Stage 1 of M1+M2: M1 (``model.z_dim``, ``net=``, ``likelihood=``, ``posterior=``,
    ``model.autoregressive``, as ``model=vae`` takes them) trained on every training image for ``model.m1_epochs`` epochs with
    ``lit.optimizer`` and ``model.m1_lit`` (e.g. ``{kl_warmup_steps: 20000}``), as
    a run of its own in ``<run>/m1`` (resumed from its last checkpoint if the job restarts);
    returns that checkpoint."""
    out = Path(cfg.paths.output_dir) / "m1"
    last = out / "checkpoints" / "last.ckpt"
    stage = cfg.copy()
    with open_dict(stage):
        stage.model = OmegaConf.create({"_target_": "vaelab.models.VAE", "_convert_": "all"})
        for key in M1_SETTINGS:
            stage.model[key] = cfg.model.get(key)
        stage.lit = OmegaConf.merge({"_target_": cfg.lit._target_, "optimizer": cfg.lit.optimizer}, cfg.model.get("m1_lit") or {})
        stage.data.labeled = None
        stage.trainer.max_epochs = cfg.model.m1_epochs
        stage.paths.output_dir = str(out)
        stage.optimized_metric, stage.test = None, False
        stage.ckpt_path = str(last) if last.is_file() else None
    log.info("M1+M2, stage 1: training M1 for %d epochs in %s", cfg.model.m1_epochs, out)
    train(stage)
    if not last.is_file() and cfg.trainer.get("fast_dev_run"):
        log.warning("fast_dev_run saves no checkpoints: M2 trains on the features of an untrained M1.")
        return None
    return str(last)


def time_left(max_time: str | dict, spent_s: float) -> str:
    """``trainer.max_time`` ("DD:HH:MM:SS" or {days, hours, minutes, seconds}) less ``spent_s``
    seconds, as "DD:HH:MM:SS", at least one second."""
    if isinstance(max_time, str):
        days, hours, minutes, seconds = map(int, max_time.split(":"))
        total = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    else:
        total = timedelta(**max_time)
    left = int(max(total.total_seconds() - spent_s, 1))
    return f"{left // 86400:02d}:{left // 3600 % 24:02d}:{left // 60 % 60:02d}:{left % 60:02d}"


def prepare_m1(cfg: DictConfig, module: LitModel, datamodule: ImageDataModule) -> LitModel:
    """Before M2 trains: M1's weights (``model.m1_ckpt``, else stage 1 trains them, and M2 gets
    what is left of ``trainer.max_time``), and the dimensions of z1 that M2 reads, chosen on the
    training images: the active ones (``model.features=null``; the module is then rebuilt for
    their number, which its checkpoints keep) or the given number that vary most."""
    start = time.monotonic()
    m1_ckpt = cfg.model.get("m1_ckpt") or train_m1(cfg)
    if cfg.trainer.get("max_time") and not cfg.model.get("m1_ckpt"):  # one budget for both stages
        with open_dict(cfg):
            cfg.trainer.max_time = time_left(cfg.trainer.max_time, time.monotonic() - start)
    if m1_ckpt:
        module.model.load_m1(m1_ckpt)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, labels = datamodule.train_set.images, datamodule.train_set.labels
    spread = feature_spread(module.model.m1, datamodule.preprocess((datamodule.prepare_eval_images(images), labels), train=False)[0])
    if cfg.model.get("features") is None:
        with open_dict(cfg):
            cfg.model.features = active_count(spread)
        m1 = module.model.m1.state_dict()  # the M1 the spread was measured on
        module = build(cfg, datamodule)
        module.model.m1.load_state_dict(m1)
    module.model.keep_active(spread)
    log.info(
        "M1+M2: M2 reads %d of z1's %d dimensions; %d have posterior means whose standard deviation over the "
        "training images exceeds %g (the kept ones: %.3f and more).",
        cfg.model.features, len(spread), active_count(spread), ACTIVE_SPREAD, float(spread[module.model.kept].min()),
    )
    return module


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, then test the best checkpoint; return every logged metric, with
    ``optimized_metric`` at the best checkpoint's value. The run directory must be this run's
    alone (``run_directory``)."""
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
    datamodule: ImageDataModule = hydra.utils.instantiate(cfg.data)
    if ckpt_path:
        settings_from_checkpoint(cfg, ckpt_path)
    model = build(cfg, datamodule)
    check_training_data(model.model, datamodule.labeled)  # before anything runs
    if isinstance(model.model, M1M2) and cfg.get("train") and not ckpt_path:
        model = prepare_m1(cfg, model, datamodule)
    with open_dict(cfg):  # what the model resolved, so the saved and logged config show it
        cfg.optimized_metric = cfg.get("optimized_metric") or f"val/{model.trained_bound}"
        cfg.lit.alpha = model.alpha
    if cfg.get("train") and cfg.optimized_metric.startswith("val/") and datamodule.val_size == 0:
        raise ValueError(
            f"data.val_size=0 leaves no validation set, but optimized_metric={cfg.optimized_metric} (which picks the "
            "best checkpoint) is measured on it: set data.val_size > 0 (the default holds out 10000)."
        )
    apply_extras(cfg)
    if ckpt_path:
        check_checkpoint(ckpt_path, model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if "vaelab.search" in sys.modules:  # a trial of an Optuna search reports to its study
        pruning = sys.modules["vaelab.search"].pruning_callback(cfg.optimized_metric)
        callbacks += [pruning] if pruning else []
    loggers = instantiate_loggers(cfg.get("logger"), resume_from=ckpt_path)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    log_hyperparameters(cfg, model, loggers)

    metrics: dict[str, float] = {}
    try:
        if cfg.get("train"):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
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
    metrics = train(cfg)
    return metric_value(metrics, cfg.optimized_metric) if cfg.get("train") else None


if __name__ == "__main__":
    main()
