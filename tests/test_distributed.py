"""Distributed training on real MNIST: DDP with 2 CPU processes (trainer=ddp_sim) on one node, and on\ntwo simulated nodes of one process each."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys

import hydra
import pytest
import pytorch_lightning as pl

from conftest import REPO_ROOT, compose_config, run_script
from vaelab.train import build


@pytest.mark.slow
@pytest.mark.parametrize("model", [["model=vae"], ["model=ssvae", "data.labeled=100"]], ids=["vae", "ssvae"])
def test_ddp_sim_trains_two_processes_into_one_run_directory(model, mnist_dir, tmp_path):
    result = run_script(
        "train.py", "trainer=ddp_sim", *model, f"paths.data_dir={mnist_dir}", f"paths.log_dir={tmp_path}",
        "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # both processes write into the run directory of rank 0
    rows = list(csv.DictReader(open(runs[0] / "csv" / "metrics.csv")))
    assert any(r.get("val/elbo") for r in rows) and any(r.get("test/elbo") for r in rows)
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file() and (runs[0] / "config.yaml").is_file()
    if "data.labeled=100" in model:
        splits = dict(re.findall(r"Rank (\d): 100 labeled examples \(data.split_seed=0\), indices (\w+)", output))
        assert set(splits) == {"0", "1"} and splits["0"] == splits["1"]
        evaluated = run_script(
            "evaluate.py", f"ckpt_path={runs[0]}/checkpoints/last.ckpt", "trainer=ddp_sim",
            f"paths.data_dir={mnist_dir}", "trainer.limit_test_batches=2", "eval.iwae_k=2", "eval.sample_quality=false",
            f"hydra.run.dir={tmp_path}/eval", "extras.print_config=false",
        )
        assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
        report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        # the confusion matrix gathers both processes' 2 test batches of 500
        assert sum(map(sum, report["confusion_matrix"])) == 2 * 2 * 500


@pytest.mark.slow
def test_the_documented_ddp_check_runs_two_processes(mnist_dir, tmp_path):
    """README: python train.py trainer=ddp_sim debug=fdr (M2, so both ranks log their split)."""
    result = run_script("train.py", "trainer=ddp_sim", "debug=fdr", "model=ssvae", "data.labeled=100",
                        f"paths.data_dir={mnist_dir}", f"paths.log_dir={tmp_path}", "logger=csv")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output
    assert set(re.findall(r"Rank (\d): 100 labeled examples", output)) == {"0", "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(*overrides: str, timeout: int = 300) -> list[str]:
    """``python train.py`` on two simulated nodes of one CPU process each, started as a user starts
    nodes by hand (Lightning's MASTER_ADDR, MASTER_PORT and NODE_RANK); each node's output."""
    port = str(free_port())
    command = [sys.executable, "train.py", "trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2", *overrides]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    nodes = [subprocess.Popen(command, cwd=REPO_ROOT, env={**env, "NODE_RANK": str(rank)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    return outputs


@pytest.mark.slow
def test_two_nodes_share_the_labels_split_the_rest_and_validate_as_one_process(mnist_dir, tmp_path):
    run, shards = tmp_path / "run", tmp_path / "shards"
    overrides = ["model=ssvae", "data.labeled=100", f"paths.data_dir={mnist_dir}", "data.val_size=2000",
                 "logger=csv", "callbacks.images=null", "extras.print_config=false", "trainer.limit_train_batches=2"]
    outputs = two_nodes(*overrides, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run}",
                        "+callbacks.shards._target_=shard_recorder.ShardRecorder", f"+callbacks.shards.directory={shards}")
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    # the labeled split is drawn identically on both nodes ...
    fingerprints = [re.findall(r"Rank (\d): 100 labeled examples \(data.split_seed=0\), indices (\w+)", out) for out in outputs]
    assert fingerprints[0][0][0] == "0" and fingerprints[1][0][0] == "1" and fingerprints[0][0][1] == fingerprints[1][0][1]
    # ... and every training set, labeled and unlabeled, is sharded: disjoint halves that cover it
    seen = [json.loads((shards / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for part, size in (("labeled", 100), ("unlabeled", 60_000 - 2000 - 100)):
        first, second = set(seen[0][part]), set(seen[1][part])
        assert len(seen[0][part]) == len(seen[1][part]) == size // 2
        assert not first & second and first | second == set(range(size)), part
    # one run directory, one set of checkpoints, written once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    logged = [row for row in csv.DictReader(open(run / "csv" / "metrics.csv")) if row.get("val/acc")]
    assert len(logged) == 1

    # validating the saved weights in one process gives what the two nodes logged together
    cfg = compose_config("train", [*overrides, "trainer=cpu", f"paths.output_dir={tmp_path / 'one'}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)  # bf16-mixed where the CPU has it
    (one,) = trainer.validate(module, datamodule=datamodule, ckpt_path=str(run / "checkpoints" / "epoch_000.ckpt"), verbose=False)
    assert float(logged[0]["val/acc"]) == pytest.approx(one["val/acc"], abs=1e-6)  # the classifier: deterministic
    assert float(logged[0]["val/ce"]) == pytest.approx(one["val/ce"], rel=1e-5)
    # U(x) draws z: each estimate's noise over 2,000 images is well under a nat
    assert float(logged[0]["val/elbo"]) == pytest.approx(one["val/elbo"], abs=1.0)

    # both nodes resume from the one checkpoint and train the next epoch
    outputs = two_nodes(*overrides, "trainer.max_epochs=2", "test=false", f"hydra.run.dir={run}",
                        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "Restored all states from the checkpoint" in outputs[0]
    assert (run / "checkpoints" / "epoch_001.ckpt").is_file()
    epochs = {row["epoch"] for row in csv.DictReader(open(run / "csv" / "metrics.csv")) if row.get("val/acc")}
    assert epochs == {"1"}
