"""Hyperparameter search with Optuna: ``python train.py -m hparams_search=ssvae_optuna``.

The search space is written in Hydra's override syntax (``choice(...)``, ``interval(...)``,
``tag(log, interval(...))``, ``range(...)``). Each trial is one training job of the multirun; it
reports ``optimized_metric`` after every validation, so the study's pruner can stop a trial whose
curve falls behind the others. A trial that raises (a diverging loss, say) is recorded as failed
and the search goes on. The study lives in a database (``storage``): running the command again
adds trials to it, several processes can share it, and ``optuna-dashboard <storage>`` browses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_running: dict[int, optuna.Trial] = {}  # the trials whose training jobs run in this process, by number


@contextmanager
def reporting_to(trial: optuna.Trial) -> Iterator[list[str]]:
    """Let the training job run inside this block report to ``trial``: yields the overrides
    that give the job an ``OptunaPruning`` callback for it (through ``callbacks:``, as every
    callback reaches a run)."""
    _running[trial.number] = trial
    try:
        yield [
            "+callbacks.optuna_pruning._target_=vaelab.search.OptunaPruning",
            f"+callbacks.optuna_pruning.trial={trial.number}",
            "+callbacks.optuna_pruning.monitor=${optimized_metric}",
        ]
    finally:
        del _running[trial.number]


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` to the trial after every validation and stops the run, raising
    ``optuna.TrialPruned``, when the study's pruner says the trial falls behind. (The callback
    of optuna-integration is written for the ``lightning`` package, not ``pytorch_lightning``.)"""

    def __init__(self, trial: int | optuna.Trial, monitor: str) -> None:
        if isinstance(trial, int) and trial not in _running:
            raise RuntimeError(f"callbacks.optuna_pruning reports to trial {trial} of an Optuna search, which does not run in this process.")
        self.trial = _running[trial] if isinstance(trial, int) else trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"optimized_metric={self.monitor!r}, which the search optimises, was not logged in validation; "
                f"logged: {', '.join(sorted(trainer.callback_metrics))}."
            )
        value = float(trainer.callback_metrics[self.monitor])
        self.trial.report(value, step=trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {trainer.global_step} steps at {self.monitor}={value:.4g}")


def distribution(override: Override) -> optuna.distributions.BaseDistribution | None:
    """The Optuna distribution of a Hydra sweep override: ``choice(a, b)`` categorical,
    ``interval(lo, hi)`` uniform (``tag(log, ...)``: log-uniform; ``int(interval(...))``: integers),
    ``range(start, stop, step)`` a stepped integer or float range; ``None`` for a plain value."""
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    if override.is_choice_sweep():
        return optuna.distributions.CategoricalDistribution(list(sweep.list))
    if override.is_interval_sweep():
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return optuna.distributions.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return optuna.distributions.FloatDistribution(sweep.start, sweep.end, log=log_scale)
    if override.is_range_sweep() and not sweep.shuffle:
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return optuna.distributions.IntDistribution(values[0], values[-1], step=int(sweep.step))
        return optuna.distributions.FloatDistribution(values[0], values[-1], step=sweep.step)
    raise ValueError(f"{override.input_line}: the Optuna search takes choice(...), interval(...) or range(...).")


def search_space(arguments: Sequence[str]) -> tuple[dict[str, optuna.distributions.BaseDistribution], list[str]]:
    """The distributions of the sweep overrides among ``arguments``, and the other overrides,
    which every trial gets as they are."""
    space, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        dist = distribution(override)
        if dist is None:
            fixed.append(override.input_line)
        else:
            space[override.get_key_element()] = dist
    return space, fixed


def suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    """``trial``'s value for ``name`` from ``dist``."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def check_compatible(study: optuna.Study, space: dict[str, optuna.distributions.BaseDistribution]) -> None:
    """Refuse a search space that the study's earlier trials searched differently (another kind
    of distribution, or other choices), which Optuna would reject in every trial."""
    for trial in study.trials:
        for name, dist in space.items():
            if name in trial.distributions:
                try:
                    optuna.distributions.check_distribution_compatibility(trial.distributions[name], dist)
                except ValueError as error:
                    raise ValueError(
                        f"Study {study.study_name!r} searched {name} as {trial.distributions[name]} in trial "
                        f"{trial.number}, not as {dist} ({error}): search it the same way, or start a new study "
                        f"with hydra.sweeper.study_name=<name>."
                    ) from None


def storage_url(storage: str | None) -> str | None:
    """``storage``, with the directory of an SQLite file created."""
    if storage and storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return storage


class OptunaSearch:
    """The sweeper's work (``hydra_plugins.vaelab_optuna.OptunaSweeper`` is its Hydra face): the
    study's objective runs each trial as a job of the multirun and returns the job's value, or
    raises why it was pruned or failed."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        if n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}: a search needs at least one trial.")
        self.study_name, self.storage, self.direction, self.n_trials = study_name, storage, direction, n_trials
        self.sampler = sampler
        # none configured: no pruning (Optuna would otherwise apply its median rule)
        self.pruner = pruner if pruner is not None else optuna.pruners.NopPruner()
        self.params = dict(params or {})
        self.launcher = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.in_process = type(self.launcher).__name__ == "BasicLauncher"
        if not self.in_process and not isinstance(self.pruner, optuna.pruners.NopPruner):
            log.warning(
                "hydra/launcher=%s runs trials in other processes, which cannot report to the study while they "
                "train: pruning is off (trials still run to the end and are told to the study).",
                self.config.hydra.launcher._target_.rsplit(".", 1)[-1],
            )

    def sweep(self, arguments: list[str]) -> optuna.Study:
        space, fixed = search_space([f"{key}={value}" for key, value in self.params.items()] + list(arguments))
        if not space:
            raise ValueError("The search has no parameters to search: give hydra.sweeper.params (see hparams_search/).")
        study = optuna.create_study(
            study_name=self.study_name, storage=storage_url(self.storage), sampler=self.sampler,
            pruner=self.pruner, direction=self.direction, load_if_exists=True,
        )
        earlier = len(study.trials)
        check_compatible(study, space)
        log.info(
            "Study %s (%s %s, %d earlier trials) in %s%s", self.study_name, self.direction,
            self.config.get("optimized_metric") or "the validation bound", earlier, self.storage or "memory",
            f"; browse it with: optuna-dashboard {self.storage}" if self.storage else "",
        )
        failures: list[str] = []

        def objective(trial: optuna.Trial) -> float:
            overrides = [*fixed, *(f"{name}={suggest(trial, name, dist)}" for name, dist in space.items())]
            trial.set_user_attr("overrides", overrides)
            with reporting_to(trial) as pruning:
                prune = self.in_process and not isinstance(self.pruner, optuna.pruners.NopPruner)
                ret = self.launcher.launch([overrides + (pruning if prune else [])], initial_job_idx=trial.number)[0]
            if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
                return float(ret.return_value)  # NaN: Optuna records the trial as failed
            error = ret._return_value if ret.status == JobStatus.FAILED else ValueError(f"the job returned {ret.return_value}")
            if not isinstance(error, optuna.TrialPruned):
                reason = f"{type(error).__name__}: {error}"
                trial.set_user_attr("error", reason)
                failures.append(f"trial {trial.number} ({' '.join(overrides)}): {reason}")
                log.warning("Trial %d failed, the search goes on: %s", trial.number, reason)
            raise error

        # catch: a failed trial is recorded as failed and the search goes on
        study.optimize(objective, n_trials=self.n_trials, catch=(Exception,))
        self._report(study, earlier, failures)
        return study

    def _report(self, study: optuna.Study, earlier: int, failures: list[str]) -> None:
        trials = study.trials[earlier:]
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
        if not counts["complete"] and failures and not counts["pruned"]:
            raise RuntimeError(f"Every trial of the search failed; the first: {failures[0]}")
        results = {"study_name": self.study_name, "storage": self.storage, "direction": self.direction,
                   "trials": {name: n for name, n in counts.items() if n}}
        try:
            best = study.best_trial
            results.update(best_value=best.value, best_params=best.params, best_trial=best.number)
            log.info("Best of the study: trial %d, %s = %.6g, %s", best.number, self.config.get("optimized_metric"),
                     best.value, best.params)
        except ValueError:  # no trial completed
            log.warning("No trial of the study has completed.")
        path = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
