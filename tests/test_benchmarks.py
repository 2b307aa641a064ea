"""Command lines of the benchmark scripts."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO_ROOT, run_script


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_table_keeps_overrides_after_an_evaluation_override_for_both_scripts():
    args = load("paper_table").parse_args(
        ["--rows", "vae_mnist_iwae50", "--eval", "eval.iwae_rows=200000", "--eval", "eval.n_examples=8", "trainer=gpu", "data.on_device=true"]
    )
    assert args.eval == ["eval.iwae_rows=200000", "eval.n_examples=8"]
    assert args.overrides == ["trainer=gpu", "data.on_device=true"]
    assert args.rows == ["vae_mnist_iwae50"]


def test_m1_features_reports_the_active_dimensions_and_accuracies_of_a_vae_run(quick_overrides, tmp_path):
    run = tmp_path / "m1"
    result = run_script(
        "train.py", *[o for o in quick_overrides if not o.startswith("paths.")], quick_overrides[0], f"hydra.run.dir={run}",
        "model.z_dim=8", "trainer.max_epochs=1", "trainer.limit_train_batches=100", "trainer.limit_val_batches=2", "test=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    data_dir = quick_overrides[0].split("=", 1)[1]
    result = run_script("benchmarks/m1_features.py", str(checkpoint), "--split-seeds", "0", "1", "--epochs", "1", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    active = int(report["active_dimensions"].split(" of ")[0])
    assert 1 <= active <= 8 and report["active_dimensions"].endswith("of 8")
    accuracies = [*report["nearest_neighbour_test_accuracy"].values(), *report["supervised_test_accuracy"].values()]
    assert len(accuracies) == 4 and all(0.1 < a <= 1 for a in accuracies)  # better than chance after one short epoch


def test_m1_features_refuses_a_run_of_another_model(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model:\n  _target_: vaelab.models.M2\ndata:\n  num_classes: 10\n")
    with pytest.raises(ValueError, match="vaelab.models.M2 run"):
        load("m1_features").run_config(tmp_path / "checkpoints" / "last.ckpt")
