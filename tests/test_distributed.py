"""Distributed training: DDP with 2 CPU processes (trainer=ddp_sim) on real MNIST."""

from __future__ import annotations

import csv
import json
import re

import pytest

from conftest import run_script


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
