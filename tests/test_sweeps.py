"""Sweeps and cluster jobs: Hydra multirun through the submitit launchers, the SLURM launcher
config, restarted jobs resuming, the Optuna search and the W&B sweep spec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vaelab.utils import CONFIG_DIR, PROJECT_ROOT


def run_train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *overrides, "logger=csv", "extras.print_config=false"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )


LIMITS = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def test_multirun_with_the_local_submitit_launcher(mnist_dir, tmp_path):
    result = run_train("-m", "hydra/launcher=local", f"paths.data_dir={mnist_dir}", f"paths.log_dir={tmp_path}", *LIMITS, "model=vae,cvae")
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # both jobs in one sweep directory, in their own subdirectories
    for job, model in (("0", "VAE"), ("1", "CVAE")):
        assert "test/elbo" in (sweeps[0] / job / "csv" / "metrics.csv").read_text()
        assert OmegaConf.load(sweeps[0] / job / ".hydra" / "config.yaml").model._target_.endswith(model)


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
    shown = subprocess.run(
        [sys.executable, "train.py", "hydra/launcher=slurm", "trainer=ddp", "--cfg", "hydra", "-p", "hydra.launcher"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0 and "nodes: ${trainer.num_nodes}" in shown.stdout, shown.stderr[-2000:]


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
