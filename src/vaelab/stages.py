"""Stages: work a model needs before it trains, declared by its config under ``stages:`` (each
entry a ``_target_``) and run by train.py in order, without knowing the model. ``model=m1m2``
declares ``PretrainM1`` (``conf/stages/pretrain_m1.yaml``)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.data import ImageDataModule
from vaelab.lit import LitModel
from vaelab.models.m1m2 import ACTIVE_SPREAD, M1_SETTINGS, active_count, feature_spread
from vaelab.utils.checkpoints import load_part

log = logging.getLogger(__name__)


class Stage(ABC):
    @abstractmethod
    def run(
        self, cfg: DictConfig, module: LitModel, datamodule: ImageDataModule,
        train: Callable[[DictConfig], dict], build: Callable[..., LitModel],
    ) -> LitModel:
        """Do the stage's work and return the module that trains next. ``cfg`` is the run's
        config (a stage may settle open settings in it), ``module`` the module as built,
        ``train`` runs a whole training run of a config as train.py does, ``build`` builds a
        module from a config."""


def time_left(max_time: str | Mapping, spent_s: float) -> str:
    """``trainer.max_time`` ("DD:HH:MM:SS" or {days, hours, minutes, seconds}) less ``spent_s``
    seconds, as "DD:HH:MM:SS", at least one second."""
    if isinstance(max_time, str):
        days, hours, minutes, seconds = map(int, max_time.split(":"))
        total = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    else:
        total = timedelta(**max_time)
    left = int(max(total.total_seconds() - spent_s, 1))
    return f"{left // 86400:02d}:{left // 3600 % 24:02d}:{left // 60 % 60:02d}:{left % 60:02d}"


class PretrainM1(Stage):
    """M1+M2's first stage (Kingma et al. 2014). M1's weights come from ``ckpt`` (a ``model=vae``
    run with the same M1 settings), or M1 (``model.z_dim``, ``net=``, ``likelihood=``,
    ``posterior=``, ``model.autoregressive``, as ``model=vae`` takes them) is trained on every
    training image for ``epochs`` epochs with ``lit.optimizer`` and ``objective`` (an ``ELBO``
    config, e.g. with a KL warm-up), as a run of its own in ``<run>/m1``, resumed from its last
    checkpoint if the job restarts; M2 then gets what is left of ``trainer.max_time``. Last, the
    dimensions of z1 that M2 reads are chosen on the training images: the active ones
    (``model.features=null``; the module is rebuilt for their number, which its checkpoints
    keep) or the given number that vary most."""

    def __init__(self, epochs: int = 100, ckpt: str | None = None, objective: Mapping | None = None) -> None:
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"stages.m1.epochs must be a positive integer, got {epochs}.")
        self.epochs, self.ckpt = epochs, ckpt
        self.objective = objective or {"_target_": "vaelab.objectives.ELBO"}

    def run(self, cfg, module, datamodule, train, build) -> LitModel:
        start = time.monotonic()
        ckpt = self.ckpt or self.train_m1(cfg, train)
        if cfg.trainer.get("max_time") and not self.ckpt:  # one budget for both stages
            with open_dict(cfg):
                cfg.trainer.max_time = time_left(cfg.trainer.max_time, time.monotonic() - start)
        if ckpt:
            load_part(ckpt, module.model.m1, "model.", "stages.m1.ckpt")
        spread = feature_spread(module.model.m1, datamodule.train_inputs())
        if cfg.model.get("features") is None:
            with open_dict(cfg):
                cfg.model.features = active_count(spread)
            m1 = module.model.m1.state_dict()  # the M1 the spread was measured on
            module = build(cfg)
            module.model.m1.load_state_dict(m1)
        module.model.keep_active(spread)
        log.info(
            "M1+M2: M2 reads %d of z1's %d dimensions; %d have posterior means whose standard deviation over the "
            "training images exceeds %g (the kept ones: %.3f and more).",
            cfg.model.features, len(spread), active_count(spread), ACTIVE_SPREAD, float(spread[module.model.kept].min()),
        )
        return module

    def train_m1(self, cfg: DictConfig, train: Callable[[DictConfig], dict]) -> str | None:
        """Train M1 as a run of its own in ``<run>/m1``; return its last checkpoint."""
        out = Path(cfg.paths.output_dir) / "m1"
        last = out / "checkpoints" / "last.ckpt"
        stage = cfg.copy()
        with open_dict(stage):
            stage.model = OmegaConf.create({"_target_": "vaelab.models.VAE", "_convert_": "all"})
            for key in M1_SETTINGS:
                stage.model[key] = cfg.model.get(key)
            stage.objective = OmegaConf.create(dict(self.objective))
            stage.lit = OmegaConf.create({"_target_": cfg.lit._target_, "optimizer": cfg.lit.optimizer})
            stage.stages = None
            stage.data.labeled = None
            stage.trainer.max_epochs = self.epochs
            stage.paths.output_dir = str(out)
            stage.optimized_metric, stage.test = None, False
            stage.ckpt_path = str(last) if last.is_file() else None
        log.info("M1+M2, stage 1: training M1 for %d epochs in %s", self.epochs, out)
        train(stage)
        if not last.is_file() and cfg.trainer.get("fast_dev_run"):
            log.warning("fast_dev_run saves no checkpoints: M2 trains on the features of an untrained M1.")
            return None
        return str(last)
