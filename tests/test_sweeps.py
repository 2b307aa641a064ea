"""Sweeps and cluster jobs: Hydra multirun through the submitit launchers, the SLURM launcher
config, restarted jobs resuming, the Optuna search and the W&B sweep spec."""

from __future__ import annotations

import subprocess

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.trial import TrialState

from vaelab.search import OptunaSearch, search_space
from vaelab.utils import CONFIG_DIR
from conftest import REPO_ROOT, run_script


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
        "lit.alpha=interval(1, 100)", "data.labeled_batch_size=tag(log, int(interval(2, 64)))", "trainer.max_epochs=3",
    ])
    assert space == {
        "lit.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.z_dim": optuna.distributions.CategoricalDistribution([8, 16]),
        "data.batch_size": optuna.distributions.IntDistribution(32, 128, step=32),
        "lit.alpha": optuna.distributions.FloatDistribution(1, 100),  # Hydra's intervals are floats...
        "data.labeled_batch_size": optuna.distributions.IntDistribution(2, 64, log=True),  # ...unless cast
    }
    assert fixed == ["trainer.max_epochs=3"]
    with pytest.raises(ValueError, match="takes choice"):
        search_space(["data.batch_size=shuffle(range(32, 129, 32))"])


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


def test_wandb_sweep_parameters_are_valid_overrides():
    spec = yaml.safe_load((REPO_ROOT / "sweeps" / "ssvae_wandb.yaml").read_text())  # W&B's syntax, not OmegaConf's
    assert (REPO_ROOT / spec["program"]).is_file() and "${args_no_hyphens}" in spec["command"]
    fixed = [arg for arg in spec["command"] if "=" in arg]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = compose(config_name="train", overrides=fixed)
        assert base.optimized_metric == spec["metric"]["name"]
        for name, space in spec["parameters"].items():
            value = space["values"][0] if "values" in space else space["min"]
            cfg = compose(config_name="train", overrides=[*fixed, f"{name}={value}"])  # unknown keys fail
            assert OmegaConf.select(cfg, name) == value
