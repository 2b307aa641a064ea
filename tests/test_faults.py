"""Faults: non-finite losses, SIGTERM, bad checkpoints, unknown choices, run directory clashes."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vaelab.evaluate import evaluate
from vaelab.lit import LitModel
from vaelab.models import VAE
from vaelab.train import train
from vaelab.utils import PROJECT_ROOT
from conftest import compose_config


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(quick_overrides, tmp_path, monkeypatch):
    bound, calls = VAE.bound, {"n": 0}

    def failing_bound(self, x, y=None):
        terms = bound(self, x, y)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 8:  # the 3rd step of the 2nd epoch
                terms.recon = terms.recon * math.nan
                terms.elbo = terms.recon - terms.kl
        return terms

    monkeypatch.setattr(VAE, "bound", failing_bound)
    overrides = [*quick_overrides, "trainer.max_epochs=3", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1"]
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 7 \(epoch 1\): train/elbo, train/recon went non-finite \(.*train/kl=[0-9.]+\)"):
        train(compose_config("train", overrides))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7  # written on the exception, before the failed step's update
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_termination_signal_writes_a_checkpoint_before_exit(signum, mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable, "train.py", "logger=csv", "trainer=cpu", f"paths.data_dir={mnist_dir}",
            f"hydra.run.dir={run_dir}", "extras.print_config=false", "data.batch_size=16",
            "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
        ],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") > 20) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 20 <= checkpoint["global_step"] < 3125, stderr[-2000:]  # mid-epoch: 3125 steps make one
    assert not list((run_dir / "checkpoints").glob("epoch_*.ckpt"))


@pytest.fixture
def vae_checkpoint(tmp_path) -> Path:
    path = tmp_path / "vae.ckpt"
    model = LitModel(VAE(input_shape=(1, 28, 28), z_dim=50))
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def test_checkpoint_of_another_model_is_rejected(quick_overrides, vae_checkpoint):
    cfg = compose_config("evaluate", [*quick_overrides, "model=cvae", f"ckpt_path={vae_checkpoint}"])
    with pytest.raises(ValueError, match="does not fit model=cvae .*missing: .*Use the model and sizes it was trained with"):
        evaluate(cfg)
    cfg = compose_config("train", [*quick_overrides, "model.z_dim=20", f"ckpt_path={vae_checkpoint}"])
    with pytest.raises(ValueError, match="does not fit model=vae .*other shape: model.decoder.head.0.weight"):
        train(cfg)


def test_a_file_that_is_no_checkpoint_is_rejected(quick_overrides, tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt is not a readable Lightning checkpoint"):
        evaluate(compose_config("evaluate", [*quick_overrides, f"ckpt_path={path}"]))
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*missing.ckpt does not exist"):
        train(compose_config("train", [*quick_overrides, f"ckpt_path={tmp_path}/missing.ckpt"]))


@pytest.mark.parametrize("choice, options", [("model=vea", ["vae", "cvae", "ssvae"]), ("data=mnsit", ["mnist", "svhn"])])
def test_unknown_config_choice_lists_the_options(choice, options):
    result = subprocess.run(
        [sys.executable, "train.py", choice, "--cfg", "job"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    group, name = choice.split("=")
    assert result.returncode != 0
    assert f"Could not find '{group}/{name}'" in result.stderr
    assert all(f"\t{option}\n" in result.stderr for option in options), result.stderr


def test_two_runs_started_in_the_same_second_get_their_own_directories(mnist_dir, tmp_path):
    command = [
        sys.executable, "train.py", f"paths.log_dir={tmp_path}", f"paths.data_dir={mnist_dir}", "logger=csv",
        "train=false", "test=false", "optimized_metric=null", "extras.print_config=false",
    ]
    processes = [subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    dirs = sorted(path.name for path in (tmp_path / "train" / "runs").iterdir())
    assert len(dirs) == 2
    assert sorted(name.rsplit("_", 1)[1] for name in dirs) == sorted(str(p.pid) for p in processes)
