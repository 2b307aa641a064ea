"""Faults: non-finite losses, SIGTERM, bad checkpoints, unknown choices, run directory clashes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vaelab.data import MNISTDataModule
from vaelab.evaluate import evaluate
from vaelab.lit import LitModel
from vaelab.models import VAE
from vaelab.train import train
from vaelab.utils.run import AtomicCheckpointIO, RunDirectoryInUse, holds_results, run_directory
from conftest import REPO_ROOT, compose_config, run_script


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(quick_overrides, tmp_path, monkeypatch):
    bound, calls = VAE.bound, {"n": 0}

    def failing_bound(self, x, y=None, qy_logits=None):
        terms = bound(self, x, y, qy_logits)
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


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_termination_signal_writes_a_checkpoint_before_exit(signum, mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable, "train.py", "logger=csv", "trainer=cpu", f"paths.data_dir={mnist_dir}",
            f"hydra.run.dir={run_dir}", "extras.print_config=false", "data.batch_size=16",
            "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
        ],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # a shell that starts the tests in the background makes them ignore SIGINT, and so the run
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") > 20) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]  # 143 or 130: schedulers see the run did not finish
    log = (run_dir / "train.log").read_text()
    assert f"Stopped by {signal.Signals(signum).name}; resume with ckpt_path={run_dir}/checkpoints/last.ckpt" in log
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
    with pytest.raises(ValueError, match=r"does not fit the configured VAE \(conditional\) \(.*missing: .*Use the model and sizes it was trained with"):
        evaluate(cfg)
    cfg = compose_config("train", [*quick_overrides, "model.z_dim=20", f"ckpt_path={vae_checkpoint}"])
    with pytest.raises(ValueError, match=r"does not fit the configured VAE \(other shape: model.decoder.head.0.weight"):
        train(cfg)


def test_a_file_that_is_no_checkpoint_is_rejected(quick_overrides, tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt is not a readable Lightning checkpoint"):
        evaluate(compose_config("evaluate", [*quick_overrides, f"ckpt_path={path}"]))
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*missing.ckpt does not exist"):
        train(compose_config("train", [*quick_overrides, f"ckpt_path={tmp_path}/missing.ckpt"]))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=f"ckpt_path={tmp_path}/run is a directory; give a checkpoint file in it, e.g. .*/checkpoints/last.ckpt"):
        evaluate(compose_config("evaluate", [*quick_overrides, f"ckpt_path={tmp_path}/run"]))


@pytest.mark.parametrize("choice, options", [("model=vea", ["vae", "cvae", "ssvae"]), ("data=mnsit", ["mnist", "svhn"])])
def test_unknown_config_choice_lists_the_options(choice, options):
    result = subprocess.run(
        [sys.executable, "train.py", choice, "--cfg", "job"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
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
    processes = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    dirs = sorted(path.name for path in (tmp_path / "train" / "runs").iterdir())
    assert len(dirs) == 2
    assert sorted(name.rsplit("_", 1)[1] for name in dirs) == sorted(str(p.pid) for p in processes)


def test_a_run_directory_holding_a_run_is_refused_and_left_as_it_was(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = ["logger=csv", "trainer=cpu", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", "extras.print_config=false"]
    first = run_script("train.py", *common, "debug=fdr")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != "train.log"}
    second = run_script("train.py", *common, "debug=fdr", "seed=7")
    assert second.returncode != 0
    assert f"Run directory {run_dir} holds another run's results (csv, images). Give this run its own directory" in second.stderr
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != "train.log"} == before


def test_of_two_processes_for_one_directory_only_one_proceeds(mnist_dir, tmp_path):
    with run_directory(tmp_path / "run"):  # this process holds it, as a running training would
        result = run_script("train.py", "logger=csv", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path}/run",
                            "train=false", "test=false", "extras.print_config=false")
    assert result.returncode != 0
    assert f"Run directory {tmp_path / 'run'} is in use by pid {os.getpid()} on " in result.stderr
    assert not (tmp_path / "run" / ".hydra").exists()


def test_a_run_resumes_inside_its_own_directory_but_a_new_run_may_not_write_there(quick_overrides, tmp_path):
    overrides = [*quick_overrides, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(compose_config("train", [*overrides, "trainer.max_epochs=1"]))
    with pytest.raises(RunDirectoryInUse, match="holds another run's results .*or continue that run with ckpt_path="):
        train(compose_config("train", [*overrides, "trainer.max_epochs=2"]))
    (tmp_path / "checkpoints" / ".last.ckpt.tmp-99999").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    first_log = (tmp_path / "csv" / "metrics.csv").read_text()
    train(compose_config("train", [*overrides, "trainer.max_epochs=2", f"ckpt_path={tmp_path}/checkpoints/last.ckpt"]))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*"))  # the half-written file is gone
    kept = list((tmp_path / "csv").glob("metrics.until-*.csv"))  # the CSV logger would delete the first run's log
    assert len(kept) == 1 and kept[0].read_text() == first_log


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def killed_mid_write(obj, file):
        file.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_atomically(quick_overrides, monkeypatch):
    written = []
    save = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint",
                        lambda self, c, path, **options: written.append(Path(path).name) or save(self, c, path, **options))
    train(compose_config("train", [*quick_overrides, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                   "trainer.limit_val_batches=1", "test=false"]))
    assert "last.ckpt" in written


@pytest.mark.parametrize("overrides, error", [
    (["data.val_size=0"], "data.val_size=0 leaves no validation set, but optimized_metric=val/elbo"),
    (["lit.optimizer.lr=-1"], "lit.optimizer: Invalid learning rate: -1"),
    (["data.labeled=100"], "VAE trains on plain batches, but data.labeled=100"),
    (["model=ssvae"], "M2 learns from a few labels and many unlabeled examples: set data.labeled=N"),
    (["model=ssvae", "data.labeled=100", "objective=elbo"], "objective=elbo trains models without a classifier; M2 learns"),
    (["objective=iwae", "objective.estimator=dreg", "posterior=planar"], "objective.estimator=dreg needs the Gaussian posterior"),
])
def test_settings_that_cannot_work_fail_before_anything_runs(overrides, error, quick_overrides, tmp_path):
    with pytest.raises(ValueError, match=error):
        train(compose_config("train", [*quick_overrides, *overrides]))
    assert not holds_results(tmp_path)  # no logs, no checkpoints: nothing ran


def test_a_labeled_batch_larger_than_the_labels_is_said(mnist_dir, caplog):
    with caplog.at_level("INFO", logger="vaelab.data.base"):
        MNISTDataModule(data_dir=str(mnist_dir), labeled=100, labeled_batch_size=200)
    assert "data.labeled_batch_size=200 is more than the 100 labeled examples: every labeled batch holds all 100" in caplog.text
