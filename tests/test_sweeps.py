"""Sweeps and cluster jobs: Hydra multirun through the submitit launchers, the SLURM launcher
config, restarted jobs resuming, the Optuna search and the W&B sweep spec."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import hydra
import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

import vaelab.train
from vaelab.metrics import metric_direction
from vaelab.search import OptunaPruning, OptunaSearch, reporting_to, search_space
from vaelab.utils import CONFIG_DIR, instantiate_callbacks
from conftest import REPO_ROOT, compose_config, run_script


def run_train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_script("train.py", *overrides, "logger=csv", "extras.print_config=false", env=env)


LIMITS = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


@pytest.mark.slow
def test_multirun_with_the_local_submitit_launcher(mnist_dir, tmp_path):
    result = run_train("-m", "hydra/launcher=local", f"paths.data_dir={mnist_dir}", f"paths.log_dir={tmp_path}", *LIMITS, "model=vae,cvae")
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # both jobs in one sweep directory, in their own subdirectories
    for job, classes in (("0", None), ("1", 10)):
        assert "test/elbo" in (sweeps[0] / job / "csv" / "metrics.csv").read_text()  # elbo_given_y for the CVAE
        assert OmegaConf.load(sweeps[0] / job / ".hydra" / "config.yaml").model.num_classes == classes


def test_slurm_launcher_takes_its_shape_from_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.account is None and launcher.qos is None
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.timeout_min > 0
    assert {"cpus_per_task", "mem_gb", "additional_parameters"} <= set(launcher)
    shown = run_script("train.py", "hydra/launcher=slurm", "trainer=ddp", "--cfg", "hydra", "-p", "hydra.launcher", timeout=120)
    assert shown.returncode == 0 and "nodes: ${trainer.num_nodes}" in shown.stdout, shown.stderr[-2000:]


@pytest.mark.slow
def test_a_restarted_cluster_job_resumes_from_its_last_checkpoint(mnist_dir, tmp_path):
    run_dir = f"hydra.run.dir={tmp_path}/run"
    common = [f"paths.data_dir={mnist_dir}", run_dir, "trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    first = run_train(*common, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(*common, "trainer.max_epochs=2", env={"SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "Restarted job: resuming from" in output and "Restoring states from the checkpoint path" in output
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 10)


def test_search_space_is_written_in_hydra_override_syntax():
    space, fixed = search_space([
        "lit.optimizer.lr=tag(log, interval(1e-4, 1e-2))", "model.z_dim=choice(8, 16)", "data.batch_size=range(32, 129, 32)",
        "objective.alpha=interval(1, 100)", "data.labeled_batch_size=tag(log, int(interval(2, 64)))", "trainer.max_epochs=3",
    ])
    assert space == {
        "lit.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.z_dim": optuna.distributions.CategoricalDistribution([8, 16]),
        "data.batch_size": optuna.distributions.IntDistribution(32, 128, step=32),
        "objective.alpha": optuna.distributions.FloatDistribution(1, 100),  # Hydra's intervals are floats...
        "data.labeled_batch_size": optuna.distributions.IntDistribution(2, 64, log=True),  # ...unless cast
    }
    assert fixed == ["trainer.max_epochs=3"]
    with pytest.raises(ValueError, match="takes choice"):
        search_space(["data.batch_size=shuffle(range(32, 129, 32))"])


def test_the_m2_search_space_names_settings_of_m2_and_parses():
    """Every parameter of hparams_search=ssvae_optuna is a key of the config it sweeps (a misspelt
    key would add a setting nothing reads) and becomes an Optuna distribution."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=ssvae_optuna"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    space, fixed = search_space([f"{key}={value}" for key, value in params.items()])
    assert not fixed and set(space) == set(params)
    assert all(OmegaConf.select(cfg, key, default="missing") != "missing" for key in params)
    assert space["objective.labeled_shift"] == optuna.distributions.CategoricalDistribution([0, 1, 2, 3])
    assert space["lit.optimizer.lr"] == optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)


def test_a_search_without_a_pruner_prunes_nothing():
    assert isinstance(OptunaSearch("s", None, "maximize", 1, pruner=None).pruner, optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="at least one trial"):
        OptunaSearch("s", None, "maximize", 0)


def test_the_search_direction_follows_the_metric():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for metric, direction in (("val/acc", "maximize"), ("val/bpd", "minimize")):
            cfg = compose(config_name="train", overrides=["hparams_search=ssvae_optuna", f"optimized_metric={metric}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == direction
            assert cfg.hydra.sweeper._target_ == "hydra_plugins.vaelab_optuna.OptunaSweeper"


def test_the_configured_sweeper_builds_its_sampler_and_pruner():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=ssvae_optuna"], return_hydra_config=True)
    search = hydra.utils.instantiate(cfg.hydra.sweeper).search
    assert isinstance(search.sampler, optuna.samplers.TPESampler) and isinstance(search.pruner, optuna.pruners.MedianPruner)
    assert search.params == OmegaConf.to_container(cfg.hydra.sweeper.params) and search.n_trials == cfg.hydra.sweeper.n_trials


def test_without_optuna_hydra_still_loads_the_plugin_and_a_search_says_how_to_install_it(monkeypatch):
    """Hydra imports every plugin on every run: the Optuna extra must not be needed for that."""
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails as if it were not installed
    for name in ("vaelab.search", "hydra_plugins.vaelab_optuna"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    plugin = importlib.import_module("hydra_plugins.vaelab_optuna")
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[optuna\]"'):
        plugin.OptunaSweeper(study_name="s", storage=None, direction="maximize", n_trials=1)


def validation(metric: str, value: float, step: int) -> SimpleNamespace:
    """What a pruning callback reads from the trainer after a validation."""
    return SimpleNamespace(sanity_checking=False, callback_metrics={metric: torch.tensor(value)}, global_step=step)


def test_a_trials_job_gets_its_pruning_callback_through_the_callbacks_config(quick_overrides):
    """reporting_to(trial) yields the overrides that add OptunaPruning to the job's callbacks:
    config, as every callback reaches a run; the callback finds the running trial by its number,
    reports the monitored metric after each validation and prunes when the study's pruner says so."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=-50.0))
    trial = study.ask()
    with reporting_to(trial) as overrides:
        cfg = compose_config("train", [*quick_overrides, "optimized_metric=val/elbo", *overrides])
        (pruning,) = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, OptunaPruning)]
        assert pruning.trial is trial and pruning.monitor == "val/elbo"  # ${optimized_metric}, resolved
        pruning.on_validation_end(SimpleNamespace(sanity_checking=True, callback_metrics={}, global_step=0), None)
        pruning.on_validation_end(validation("val/elbo", -20.0, 5), None)  # above the threshold: goes on
        with pytest.raises(optuna.TrialPruned, match="pruned after 9 steps at val/elbo=-90"):
            pruning.on_validation_end(validation("val/elbo", -90.0, 9), None)
        with pytest.raises(KeyError, match="optimized_metric='val/elbo', which the search optimises, was not logged"):
            pruning.on_validation_end(validation("val/acc", 0.5, 10), None)
    assert study.trials[0].intermediate_values == {5: -20.0, 9: -90.0}  # the sanity check reported nothing
    with pytest.raises(RuntimeError, match="reports to trial 0 of an Optuna search, which does not run in this process"):
        OptunaPruning(trial.number, "val/elbo")  # the trial's job is over
    assert not any(isinstance(c, OptunaPruning) for c in instantiate_callbacks(compose_config("train", quick_overrides).callbacks))


class InProcessLauncher:
    """Runs each trial's job in this process as train.py would meet it: its config composed from
    the trial's overrides, its callbacks instantiated, then validations reporting val/elbo =
    ``curves[model.z_dim]`` one after the other; returns the last value, or fails with what was raised."""

    def __init__(self, base: list[str], curves: dict[int, list[float]]) -> None:
        self.base, self.curves, self.launched = base, curves, []

    def launch(self, job_overrides, initial_job_idx):
        (overrides,) = job_overrides
        self.launched.append(list(overrides))
        cfg = compose_config("train", [*self.base, "optimized_metric=val/elbo", *overrides])
        callbacks = instantiate_callbacks(cfg.callbacks)
        result = JobReturn(overrides=overrides)
        try:
            for step, value in enumerate(self.curves[cfg.model.z_dim], start=1):
                for callback in callbacks:
                    if isinstance(callback, OptunaPruning):
                        callback.on_validation_end(validation("val/elbo", value, 10 * step), None)
            result.status, result.return_value = JobStatus.COMPLETED, value
        except Exception as error:
            result.status, result.return_value = JobStatus.FAILED, error
        return [result]


@pytest.mark.parametrize("pruner", ["threshold", None])
def test_a_trial_its_pruner_stops_is_recorded_as_pruned(pruner, quick_overrides, tmp_path):
    curves = {4: [-40.0, -80.0, -70.0], 8: [-30.0, -20.0, -10.0]}  # z_dim=4 falls below the threshold at its second validation
    search = OptunaSearch(
        "s", None, "maximize", 2, sampler=optuna.samplers.BruteForceSampler(seed=0),
        pruner=optuna.pruners.ThresholdPruner(lower=-50.0) if pruner else None,
    )
    search.launcher, search.in_process = InProcessLauncher(quick_overrides, curves), True
    search.config = OmegaConf.create({"optimized_metric": "val/elbo", "hydra": {"sweep": {"dir": str(tmp_path)}}})
    study = search.sweep(["model.z_dim=choice(4, 8)"])
    trials = {t.params["model.z_dim"]: t for t in study.trials}
    for overrides in search.launcher.launched:  # pruning reaches the job through its overrides, and only with a pruner
        assert any(o.startswith("+callbacks.optuna_pruning.trial=") for o in overrides) == bool(pruner)
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert trials[8].state == TrialState.COMPLETE and trials[8].value == -10.0 and results.best_value == -10.0
    if pruner:
        assert trials[4].state == TrialState.PRUNED and trials[4].intermediate_values == {10: -40.0, 20: -80.0}
        assert "error" not in trials[4].user_attrs  # a pruned trial is no failure
        assert results.trials == {"complete": 1, "pruned": 1}
    else:
        assert trials[4].state == TrialState.COMPLETE and trials[4].value == -70.0 and not trials[4].intermediate_values
        assert results.trials == {"complete": 2}


def test_trials_in_other_processes_are_not_pruned(quick_overrides, tmp_path, caplog):
    """A launcher that runs jobs in other processes (SLURM): no trial can report to the study while it
    trains, so the jobs get no pruning callback and run to the end."""
    search = OptunaSearch("s", None, "maximize", 1, pruner=optuna.pruners.ThresholdPruner(lower=0.0))
    search.launcher, search.in_process = InProcessLauncher(quick_overrides, {4: [-40.0]}), False
    search.config = OmegaConf.create({"optimized_metric": "val/elbo", "hydra": {"sweep": {"dir": str(tmp_path)}}})
    study = search.sweep(["model.z_dim=choice(4)"])
    assert study.trials[0].state == TrialState.COMPLETE
    assert not any("optuna_pruning" in o for o in search.launcher.launched[0])


@pytest.mark.slow
def test_optuna_search_records_failures_prunes_and_resumes_from_its_storage(mnist_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    common = ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s",
              f"paths.data_dir={mnist_dir}", f"paths.log_dir={tmp_path}", *LIMITS]
    # a diverging trial (lr 1e30: the loss is NaN on the second step) fails; the search goes on
    first = run_train(*common, "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=null",
                      "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler", "lit.optimizer.lr=choice(0.001, 1e30)")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "failed, the search goes on: FloatingPointError" in first.stdout + first.stderr
    # the same storage again: one more trial in the same study, pruned at its first validation
    again = run_train(*common, "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
                      "~hydra.sweeper.pruner.n_startup_trials", "~hydra.sweeper.pruner.n_warmup_steps",
                      "+hydra.sweeper.pruner.lower=0.0", "model.z_dim=choice(4, 8)")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="s", storage=storage).trials
    states = {t.params["lit.optimizer.lr"]: t.state for t in trials[:2]}  # both values, each once
    assert states == {0.001: TrialState.COMPLETE, 1e30: TrialState.FAIL}
    assert "FloatingPointError" in next(t for t in trials if t.state == TrialState.FAIL).user_attrs["error"]
    assert len(trials) == 3 and trials[2].state == TrialState.PRUNED
    assert list(trials[2].intermediate_values) == [3]  # val/elbo reported after the 3 training steps, then pruned
    completed = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert -1000 < completed.value < 0  # val/elbo of the best checkpoint
    results = sorted(tmp_path.glob("train/multiruns/*/optimization_results.yaml"))
    assert OmegaConf.load(results[-1]).best_value == pytest.approx(completed.value)
    assert OmegaConf.load(results[-1]).trials == {"pruned": 1}
    # a space that the study searched otherwise is refused before any trial runs
    other = run_train(*common, "hydra.sweeper.n_trials=1", "lit.optimizer.lr=tag(log, interval(1e-4, 1e-3))")
    assert other.returncode == 1 and "start a new study with hydra.sweeper.study_name" in other.stderr
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


# where each parameter of the W&B sweep takes effect, in the module (and data) that train.py builds
SWEPT = {
    "lit.optimizer.lr": lambda module, data: module.configure_optimizers().param_groups[0]["lr"],
    "model.z_dim": lambda module, data: module.model.z_dim,
    "objective.alpha": lambda module, data: module.objective.alpha,
    "objective.class_balance": lambda module, data: module.objective.class_balance,
    "objective.labeled_shift": lambda module, data: module.objective.labeled_shift,
    "objective.labeled_rotation": lambda module, data: module.objective.labeled_rotation,
    "data.labeled_batch_size": lambda module, data: data.labeled_batch_size,
}


def test_wandb_sweep_parameters_reach_what_they_set():
    """sweeps/ssvae_wandb.yaml searches the parameters of hparams_search=ssvae_optuna, each an
    override of train.yaml that reaches the optimizer, model, objective or data that train.py
    builds, with the command's fixed arguments."""
    spec = yaml.safe_load((REPO_ROOT / "sweeps" / "ssvae_wandb.yaml").read_text())  # W&B's syntax, not OmegaConf's
    assert (REPO_ROOT / spec["program"]).is_file() and "${args_no_hyphens}" in spec["command"]
    fixed = [arg for arg in spec["command"] if "=" in arg]
    assert metric_direction(spec["metric"]["name"]) == spec["metric"]["goal"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        optuna_space = compose(config_name="train", overrides=["hparams_search=ssvae_optuna"], return_hydra_config=True).hydra.sweeper.params
        assert set(spec["parameters"]) == set(optuna_space) == set(SWEPT)  # the same space as the Optuna search
        base = compose(config_name="train", overrides=fixed)
        assert base.optimized_metric == spec["metric"]["name"]
        base_data = hydra.utils.instantiate(base.data)
        facts = SimpleNamespace(binary=True, labeled=base_data.labeled, train_size=50_000)
        base_module = vaelab.train.build(base, facts)
        for name, space in spec["parameters"].items():
            # a value of the space that the command's own settings do not already give
            value = next(v for v in space.get("values", [space.get("min")]) if SWEPT[name](base_module, base_data) != pytest.approx(v))
            cfg = compose(config_name="train", overrides=[*fixed, f"{name}={value}"])  # unknown keys fail
            data = hydra.utils.instantiate(cfg.data)
            module = vaelab.train.build(cfg, facts)
            assert SWEPT[name](module, data) == pytest.approx(value), name
