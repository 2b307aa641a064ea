"""Faults: non-finite losses, SIGTERM, bad checkpoints, unknown choices, run directory clashes."""

from __future__ import annotations

import contextlib
import errno
import shutil
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict

from vaelab.data import MNISTDataModule
from vaelab.evaluate import evaluate
from vaelab.lit import LitModel
from vaelab.models import VAE
from vaelab.train import build, train
import vaelab.utils.run as run_module
from vaelab.utils.run import AtomicCheckpointIO, atomic_write, RunDirectoryInUse, holds_results, run_directory
from conftest import REPO_ROOT, compose_config, run_script


def good_checkpoint_message(path: Path) -> str:
    return re.escape(f"The newest good checkpoint: {path}; resume with ckpt_path={path}.")


def finite_bound(path: Path, overrides: list[str]) -> float:
    """The mean bound that the weights of checkpoint ``path`` give on 100 real test images,
    for the model that ``overrides`` configure; fails unless it is finite."""
    cfg = compose_config("train", overrides)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    x, y = datamodule.example_batch(100)
    with torch.no_grad():
        bound = float(module.eval().model.bound(x, y).elbo.mean())
    assert math.isfinite(bound), f"{path} gives the bound {bound}"
    return bound


@pytest.mark.parametrize("model", ["vae", "cvae"])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(model, quick_overrides, tmp_path, monkeypatch):
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
    overrides = [*quick_overrides, f"model={model}", "trainer.max_epochs=3", "trainer.limit_train_batches=5",
                 "trainer.limit_val_batches=1", "test=false"]
    last_path = tmp_path / "checkpoints" / "last.ckpt"
    failed = r"Non-finite loss at step 7 \(epoch 1\): train/elbo(_given_y)?, train/recon went non-finite \(.*train/kl=[0-9.]+\)"
    with pytest.raises(FloatingPointError, match=failed) as error:
        train(compose_config("train", overrides))
    assert re.search(good_checkpoint_message(last_path), str(error.value)), str(error.value)
    assert "no checkpoint was written with these weights" in str(error.value)
    last = torch.load(last_path, weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 5)  # the end of the first epoch: no checkpoint of the failing weights
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())
    monkeypatch.undo()
    finite_bound(last_path, overrides)


def test_a_diverging_resume_in_place_keeps_the_last_good_checkpoint(quick_overrides, tmp_path):
    overrides = [*quick_overrides, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                 "data.batch_size=32"]
    train(compose_config("train", [*overrides, "trainer.max_epochs=1"]))
    last_path = tmp_path / "checkpoints" / "last.ckpt"
    before = last_path.read_bytes()
    with pytest.raises(FloatingPointError, match=r"Non-finite (loss|gradient) at step \d+ \(epoch 1\)") as error:
        train(compose_config("train", [*overrides, "trainer.max_epochs=2", "lit.optimizer.lr=1e6", f"ckpt_path={last_path}"]))
    assert re.search(good_checkpoint_message(last_path), str(error.value)), str(error.value)
    assert last_path.read_bytes() == before  # the diverged weights were never written over it
    assert torch.load(last_path, weights_only=True)["global_step"] == 2
    metrics = evaluate(compose_config("evaluate", [
        *[o for o in quick_overrides if not o.startswith("paths.output_dir")], f"paths.output_dir={tmp_path}/eval",
        f"ckpt_path={last_path}", "trainer.limit_test_batches=1", "data.eval_batch_size=100", "eval.iwae_k=0",
        "eval.n_latent=100", "eval.n_examples=8",
    ]))
    assert math.isfinite(metrics["test/elbo"])


@pytest.mark.parametrize("model", ["vae", "cvae"])
def test_a_non_finite_validation_metric_leaves_the_earlier_last_checkpoint(model, quick_overrides, tmp_path, monkeypatch, caplog):
    log_terms = LitModel.log_terms

    def nan_in_the_second_validation(self, terms, stage):
        if stage == "val" and self.current_epoch == 1 and not self.trainer.sanity_checking:
            terms = {name: value * math.nan for name, value in terms.items()}
        log_terms(self, terms, stage)

    monkeypatch.setattr(LitModel, "log_terms", nan_in_the_second_validation)
    overrides = [*quick_overrides, f"model={model}", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "test=false"]
    with caplog.at_level("WARNING", logger="vaelab.callbacks.checkpoint"):
        train(compose_config("train", overrides))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 2)  # the second epoch's state was not written
    assert "is not finite: " in caplog.text and "keeps the last good state" in caplog.text


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
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0 \(or max_steps=0\) trains nothing; set it to at least 1"),
    (["+trainer.max_steps=0", "model=cvae"], r"trainer.max_epochs=0 \(or max_steps=0\) trains nothing; set it to at least 1"),
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


# -- restored configs are data: no foreign _target_ is built from them --------------------------

@pytest.fixture
def files_to_copy(tmp_path) -> tuple[Path, Path]:
    """A file and where a foreign ``shutil.copyfile`` target would copy it."""
    source = tmp_path / "source.txt"
    source.write_text("not to be copied")
    return source, tmp_path / "copied.txt"


def run_with_saved_config(tmp_path: Path, quick_overrides: list[str], key: str, node: dict) -> Path:
    """``<tmp>/run`` as a training run leaves it: a checkpoint of the default VAE and a
    ``.hydra/config.yaml`` whose ``key`` was replaced by ``node``; returns the checkpoint."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": LitModel(VAE(input_shape=(1, 28, 28), z_dim=50)).state_dict()}, checkpoint)
    saved = compose_config("train", quick_overrides)
    with open_dict(saved):
        OmegaConf.update(saved, key, node, merge=False, force_add=True)
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    return checkpoint


def evaluate_overrides(quick_overrides: list[str], tmp_path: Path, checkpoint: Path, *more: str) -> list[str]:
    return [*[o for o in quick_overrides if not o.startswith("paths.output_dir")], f"paths.output_dir={tmp_path}/eval",
            f"ckpt_path={checkpoint}", "trainer.limit_test_batches=1", "data.eval_batch_size=100", "eval.iwae_k=0",
            "eval.n_latent=100", "eval.n_examples=8", *more]


@pytest.mark.parametrize("key, where", [
    ("model", "model"),
    ("data.something", "data.something"),  # nested below a section of vaelab's own
    ("model.net.hidden", "model.net.hidden[1]"),  # inside a list
])
def test_a_restored_run_config_may_not_build_a_foreign_target(key, where, quick_overrides, tmp_path, files_to_copy):
    source, copy = files_to_copy
    foreign = {"_target_": "shutil.copyfile", "_args_": [str(source), str(copy)]}
    checkpoint = run_with_saved_config(tmp_path, quick_overrides, key, [500, foreign] if key.endswith("hidden") else foreign)
    with pytest.raises(ValueError, match=re.escape(f"asks to build 'shutil.copyfile' (at {where})") + ".*refused without running it. "
                       + re.escape("If you trust that run, allow it: restore_targets='[vaelab., shutil.copyfile]'.")):
        evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, checkpoint)))
    assert not copy.exists()
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize("key", ["model", "data.something"])
def test_restore_targets_allows_a_trusted_target(key, quick_overrides, tmp_path, files_to_copy):
    source, copy = files_to_copy
    checkpoint = run_with_saved_config(tmp_path, quick_overrides, key, {"_target_": "shutil.copyfile", "_args_": [str(source), str(copy)]})
    with contextlib.suppress(Exception):  # what it builds is no model or data: the evaluation fails after building it
        evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, checkpoint, "restore_targets=[vaelab.,shutil.]")))
    assert copy.read_text() == "not to be copied"  # built: the allow-list is what refused it


@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_a_checkpoint_whose_model_config_names_a_foreign_target_is_refused(entry, nested, quick_overrides, tmp_path, files_to_copy):
    source, copy = files_to_copy
    foreign = {"_target_": "shutil.copyfile", "_args_": [str(source), str(copy)]}
    model_config = {"_target_": "vaelab.models.VAE", "input_shape": [1, 28, 28], "z_dim": 50, "net": foreign} if nested else foreign
    checkpoint = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": LitModel(VAE(input_shape=(1, 28, 28), z_dim=50)).state_dict(),
                "hyper_parameters": {"model_config": model_config}}, checkpoint)
    message = re.escape(f"the model config in {checkpoint} asks to build 'shutil.copyfile' (at {'model.net' if nested else 'model'})")
    with pytest.raises(ValueError, match=message):
        if entry == "train":
            train(compose_config("train", [*quick_overrides, f"ckpt_path={checkpoint}", "trainer.max_epochs=2"]))
        else:
            evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, checkpoint)))
    assert not copy.exists()
    assert not holds_results(tmp_path) and not holds_results(tmp_path / "eval")


# -- results that are not numbers --------------------------------------------------------------

def strict_json(text: str) -> dict:
    """Standard JSON only: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not standard JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(params=["nan", "huge"])
def diverged_checkpoint(request, tmp_path) -> tuple[Path, dict[str, str]]:
    """A VAE checkpoint whose weights diverged: one weight infinite (every term NaN), or the
    posterior means huge (the KL infinite, the bound -inf); with the metrics it spoils."""
    module = LitModel(VAE(input_shape=(1, 28, 28), z_dim=50))
    with torch.no_grad():
        if request.param == "nan":
            module.model.encoder.head[0].weight[0, 0] = math.inf
            spoiled = {"test/elbo": "nan", "test/kl": "nan", "test/recon": "nan"}
        else:
            module.model.encoder.head[4].bias[:50] = 1e30
            spoiled = {"test/elbo": "-inf", "test/kl": "inf"}
    path = tmp_path / f"diverged-{request.param}.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__}, path)
    return path, spoiled


def check_report_of_non_finite_results(path: Path, spoiled: dict[str, str]) -> None:
    metrics = strict_json(path.read_text())["metrics"]
    assert {name for name, value in metrics.items() if value is None} == set(spoiled)
    assert all(isinstance(value, float) for name, value in metrics.items() if name not in spoiled)


def test_evaluating_diverged_weights_raises_and_writes_standard_json(diverged_checkpoint, quick_overrides, tmp_path):
    checkpoint, spoiled = diverged_checkpoint
    with pytest.raises(FloatingPointError) as error:
        evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, checkpoint)))
    message = str(error.value)
    assert f"the checkpoint {checkpoint} gives results that are not numbers" in message
    assert all(f"{name}={value}" in message for name, value in spoiled.items()), message
    check_report_of_non_finite_results(tmp_path / "eval" / "metrics.json", spoiled)


def test_the_evaluate_command_fails_on_diverged_weights(diverged_checkpoint, mnist_dir, tmp_path):
    checkpoint, spoiled = diverged_checkpoint
    result = run_script(
        "evaluate.py", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path}/eval", f"ckpt_path={checkpoint}", "logger=csv",
        "trainer=cpu", "extras.print_config=false", "trainer.limit_test_batches=1", "data.eval_batch_size=100", "eval.iwae_k=5",
    )
    assert result.returncode != 0
    assert "FloatingPointError" in result.stderr and str(checkpoint) in result.stderr, result.stderr[-3000:]
    check_report_of_non_finite_results(tmp_path / "eval" / "metrics.json", {**spoiled, "test/nll_iwae": "any"})
    log = (tmp_path / "eval" / "evaluate.log").read_text()
    assert "FloatingPointError: " in log and "gives results that are not numbers" in log.splitlines()[-1]


# -- a full disk ---------------------------------------------------------------------------------

def torch_disk_full_error() -> RuntimeError:
    """What torch's zip writer raises when the disk fills: the OSError is only its context."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")
    except RuntimeError as error:
        return error


def free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free, free))


def checkpoint_write_fails(make_error, raised: list | None = None):
    """A stand-in for ``torch.save`` that writes part of the file, then raises a new
    ``make_error()`` (kept in ``raised``), as torch raises a new error for every failed write."""
    def save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 part of a checkpoint")
        error = make_error()
        if raised is not None:
            raised.append(error)
        raise error
    return save


@pytest.mark.parametrize("how", ["torch_error", "no_free_space", "os_error"])
@pytest.mark.parametrize("earlier", [True, False], ids=["earlier_file", "first_write"])
def test_a_full_disk_is_said_and_the_earlier_file_stays(how, earlier, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    if earlier:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    if how == "torch_error":  # the disk filled: torch's own error, with ENOSPC as its context
        monkeypatch.setattr(torch, "save", checkpoint_write_fails(torch_disk_full_error))
    elif how == "no_free_space":  # a bare "unexpected pos", with no space left on the disk
        free_space(monkeypatch, 0)
        bare = "[enforce fail at inline_container.cc:672] . unexpected pos 0 vs 64"
        monkeypatch.setattr(torch, "save", checkpoint_write_fails(lambda: RuntimeError(bare)))
    with pytest.raises(OSError) as error:
        if how == "os_error":  # a text file (metrics.json) whose write fails as the OS reports it
            with atomic_write(path) as file:
                file.write("{")
                raise OSError(errno.ENOSPC, "No space left on device")
        else:
            AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert "No space left on device" in message and f"while writing {path};" in message, message
    if earlier:
        assert "the earlier file there is intact" in message
        assert torch.load(path, weights_only=True) == {"step": 1}
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no part of the new file
    else:
        assert "nothing was written there" in message and not any(path.parent.iterdir())


@pytest.mark.parametrize("make_error", [lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
                                        lambda: OSError(errno.EACCES, "Permission denied"), lambda: ValueError("not a disk problem")],
                         ids=["runtime", "permission", "value"])
def test_a_write_error_other_than_a_full_disk_passes_through_unchanged(make_error, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    free_space(monkeypatch, 2**35)
    errors = []
    monkeypatch.setattr(torch, "save", checkpoint_write_fails(make_error, errors))
    with pytest.raises(Exception) as raised:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert raised.value is errors[0]  # the very error, not wrapped
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_training_run_whose_checkpoint_cannot_be_written_ends_with_enospc(quick_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", checkpoint_write_fails(torch_disk_full_error))
    # the write that failed first is named: last.ckpt is not tried again on a full disk
    with pytest.raises(OSError, match=rf"No space left on device \(ENOSPC\) while writing {tmp_path}/checkpoints/epoch_000\.ckpt;") as error:
        train(compose_config("train", [*quick_overrides, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                       "trainer.limit_val_batches=1", "test=false"]))
    assert error.value.errno == errno.ENOSPC
    assert not list((tmp_path / "checkpoints").glob("*"))  # nothing half-written


DISK_FILLS_AT_CHECKPOINTS = """
import errno, sys, torch
from vaelab.train import main
save = torch.save
def full(obj, file, *args, **kwargs):
    if ".ckpt" not in str(getattr(file, "name", "")):
        return save(obj, file, *args, **kwargs)
    file.write(b"PK part")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError({error!r})
torch.save = full
main()
"""


@pytest.mark.parametrize("error, said", [
    ("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456",
     "OSError: [Errno 28] No space left on device (ENOSPC) while writing {ckpt}"),
    ("CUDA error: an illegal memory access", "RuntimeError: CUDA error: an illegal memory access"),
], ids=["disk_full", "other"])
def test_the_train_command_ends_with_the_write_error(error, said, mnist_dir, tmp_path):
    """The disk filling while a checkpoint is written (torch's error with ENOSPC inside) ends the
    run with ENOSPC and the checkpoint's path, on the console and in train.log; another error of
    the writer stays as it was (its context is no full disk: free_space says there is room)."""
    run_dir = tmp_path / "run"
    code = DISK_FILLS_AT_CHECKPOINTS.format(error=error)
    if "CUDA" in error:  # another error, from another OSError than a full disk
        code = code.replace('raise OSError(errno.ENOSPC, "No space left on device")', 'raise OSError(errno.EIO, "Input/output error")')
    result = run_script("-c", code, "logger=csv", "trainer=cpu", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}",
                        "extras.print_config=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                        "trainer.limit_val_batches=1", "test=false")
    assert result.returncode != 0
    pattern = re.escape(said.format(ckpt=run_dir / "checkpoints")) + (r"/\S+\.ckpt;" if "{ckpt}" in said else "")
    errors = [line for line in result.stderr.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    assert re.match(pattern, errors[-1]), result.stderr[-3000:]
    last_line = (run_dir / "train.log").read_text().splitlines()[-1]
    assert re.search(pattern, last_line), last_line


def test_a_write_error_with_a_cyclic_chain_is_judged_in_finite_time(tmp_path, monkeypatch):
    """An error raised again while its own wrapper is handled (Lightning's on_exception saving
    once more after a failed save) has a cyclic __cause__/__context__ chain: judging whether it
    is a full disk must still end."""
    first, wrapper = RuntimeError("CUDA error: an illegal memory access"), OSError(errno.EIO, "wrapped")
    first.__context__, wrapper.__cause__ = wrapper, first  # first -> wrapper -> first -> ...
    free_space(monkeypatch, 2**35)

    def too_long(signum, frame):
        raise TimeoutError("atomic_write did not return within 2 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(2)
    try:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            with atomic_write(tmp_path / "metrics.json") as file:
                file.write("{")
                raise first
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- settings that cannot work ------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("inside", ["", "checkpoints"], ids=["run_dir", "checkpoints_dir"])
def test_a_directory_given_as_checkpoint_is_said(entry, inside, quick_overrides, tmp_path):
    directory = tmp_path / "elsewhere" / "run"
    (directory / "checkpoints").mkdir(parents=True)
    given = directory / inside if inside else directory
    with pytest.raises(IsADirectoryError, match=re.escape(f"ckpt_path={given} is a directory; give a checkpoint file in it")):
        if entry == "train":
            train(compose_config("train", [*quick_overrides, f"ckpt_path={given}"]))
        else:
            evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, given)))
    assert not holds_results(tmp_path) and not holds_results(tmp_path / "eval")


@pytest.mark.parametrize("model, change", [("vae", "model.net.activation=softplus"), ("cvae", "model.net.activation=elu")])
def test_resuming_with_other_model_settings_is_refused_unless_allowed(model, change, quick_overrides, tmp_path, caplog):
    overrides = [*quick_overrides, f"model={model}", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(compose_config("train", [*overrides, "trainer.max_epochs=1"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    resume = [*overrides, "trainer.max_epochs=2", f"ckpt_path={last}", change]
    activation = change.split("=")[1]
    with pytest.raises(ValueError, match=rf"ckpt_path={last} was trained with other model settings: model.net=.*'activation': '{activation}'"
                                         rf".*\(checkpoint: .*'activation': 'relu'.*set allow_model_change=true"):
        train(compose_config("train", resume))
    assert last.read_bytes() == before
    with caplog.at_level("WARNING", logger="vaelab.utils.checkpoints"):
        train(compose_config("train", [*resume, "allow_model_change=true"]))
    assert "Resuming with changed model settings (allow_model_change=true): model.net=" in caplog.text
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["hyper_parameters"]["model_config"]["net"]["activation"] == activation


@pytest.mark.parametrize("setting, message", [
    ("eval.samples_per_class=0", "eval.samples_per_class must be a positive integer, got 0."),
    ("eval.n_examples=0", "eval.n_examples must be a positive integer, got 0."),
    ("eval.n_latent=-5", "eval.n_latent must be a positive integer, got -5."),
    ("eval.classifier_epochs=0", "eval.classifier_epochs must be a positive integer, got 0."),
    ("eval.classifier_min_acc=1.5", "eval.classifier_min_acc must be a share in [0, 1], got 1.5."),
])
def test_evaluation_settings_that_cannot_work_fail_before_anything_is_written(setting, message, quick_overrides, tmp_path, vae_checkpoint):
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(compose_config("evaluate", evaluate_overrides(quick_overrides, tmp_path, vae_checkpoint, setting)))
    assert not (tmp_path / "eval" / "metrics.json").exists() and not holds_results(tmp_path / "eval")


def test_the_run_logs_hold_lightning_and_the_metrics(mnist_dir, tmp_path):
    common = ["logger=csv", "trainer=cpu", f"paths.data_dir={mnist_dir}", "extras.print_config=false"]
    trained = run_script("train.py", *common, f"hydra.run.dir={tmp_path}/run", "trainer.max_epochs=1",
                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "[pytorch_lightning" in log and "`Trainer.fit` stopped: `max_epochs=1` reached." in log, log
    assert re.search(r"\[vaelab.train\]\[INFO\] - Metrics: .*test/elbo=-[0-9.]+.*val/elbo=-[0-9.]+", log), log
    evaluated = run_script("evaluate.py", *common, f"hydra.run.dir={tmp_path}/eval", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt",
                           "trainer.limit_test_batches=1", "eval.iwae_k=0", "eval.n_latent=100")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    log = (tmp_path / "eval" / "evaluate.log").read_text()
    assert "[pytorch_lightning" in log and f"Wrote {tmp_path}/eval/metrics.json" in log, log
    assert re.search(r"\[vaelab.evaluate\]\[INFO\] - Metrics: .*test/elbo=-[0-9.]+", log), log
