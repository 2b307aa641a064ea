"""Command lines of the benchmark scripts."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import hydra
import pytest
import torch

from conftest import REPO_ROOT, compose_config, run_script

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the scripts import registry.py beside them


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", sorted(load("paper_table").ROWS))
def test_every_paper_table_row_builds_the_model_and_objective_it_compares(row, quick_overrides):
    """Each row of paper_table.py is an experiment that composes and builds; the semi-supervised
    rows (compared by test error) train with the semi-supervised objective, the likelihood rows
    with a bound of the images alone."""
    from vaelab.objectives import SemiSupervised
    from vaelab.train import build

    cfg = compose_config("train", [*quick_overrides, f"experiment={row}", "train=false"])
    objective = hydra.utils.instantiate(cfg.objective)
    model = hydra.utils.instantiate(cfg.model)
    compared = load("paper_table").ROWS[row][0]
    assert isinstance(objective, SemiSupervised) == compared.startswith("test error")
    assert model.has_classifier == compared.startswith("test error")
    if not row.endswith("svhn_1000"):  # SVHN's files are not here; the MNIST rows build whole
        assert build(cfg, hydra.utils.instantiate(cfg.data)).model.has_classifier == model.has_classifier


def one_epoch_run(quick_overrides, run, *overrides: str):
    """Train one short epoch with train.py into ``run``; return its last checkpoint."""
    result = run_script(
        "train.py", *[o for o in quick_overrides if not o.startswith("paths.")], quick_overrides[0], f"hydra.run.dir={run}",
        "trainer.max_epochs=1", "trainer.limit_val_batches=2", "test=false", *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def test_m1_features_reports_the_active_dimensions_and_accuracies_of_a_vae_run(quick_overrides, tmp_path):
    checkpoint = one_epoch_run(quick_overrides, tmp_path / "m1", "model.z_dim=8", "trainer.limit_train_batches=100")
    data_dir = quick_overrides[0].split("=", 1)[1]
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/m1_features.py", str(checkpoint), "--split-seeds", "0", "1", "--epochs", "1", "--data-dir", data_dir,
                        env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(registry.read_text())["figures"]["active_dimensions"] == report["active_dimensions"]
    active = int(report["active_dimensions"].split(" of ")[0])
    assert 1 <= active <= 8 and report["active_dimensions"].endswith("of 8")
    accuracies = [*report["nearest_neighbour_test_accuracy"].values(), *report["supervised_test_accuracy"].values()]
    assert len(accuracies) == 4 and all(0.1 < a <= 1 for a in accuracies)  # better than chance after one short epoch


def test_m1_features_refuses_a_run_of_another_model(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model:\n  _target_: vaelab.models.M2\ndata:\n  num_classes: 10\n")
    with pytest.raises(ValueError, match="vaelab.models.M2 run"):
        load("m1_features").run_config(tmp_path / "checkpoints" / "last.ckpt")


def test_judges_scores_one_checkpoints_samples_with_each_judge_and_records_it(quick_overrides, tmp_path):
    checkpoint = one_epoch_run(quick_overrides, tmp_path / "cvae", "model=cvae", "trainer.limit_train_batches=30")
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/judges.py", str(checkpoint), "--epochs", "1", "--seeds", "0", "1",
                        "--per-class", "20", "--limit-train-batches", "30", "--data-dir", quick_overrides[0].split("=", 1)[1],
                        env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(registry.read_text())["figures"]
    assert figures["judges"].keys() == {"1 epochs, seed 0", "1 epochs, seed 1"} and figures["samples_per_class"] == 20
    for name, scores in figures["judges"].items():
        real, samples = map(float, scores.split(" / "))
        assert 20 < real <= 100 and 0 <= samples <= 100  # judges better than chance after 30 batches
        assert samples == pytest.approx(sum(figures["per_class"][name]) / 10, abs=0.1)
    assert len(set(figures["judges"].values())) == 2  # each seed trains its own judge


@pytest.mark.parametrize("script", ["judges", "m1_features"])
def test_the_checkpoint_scripts_refuse_a_run_config_that_builds_foreign_code(script, tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: vaelab.models.VAE\ndata:\n  _target_: vaelab.data.MNISTDataModule\n  transform:\n    _target_: os.system\n    command: echo owned\n")
    with pytest.raises(ValueError, match=r"asks to build 'os.system' \(at data.transform\).*refused without running it\. This script builds vaelab's own classes only\.$"):
        load(script).run_config(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_part_end_to_end_with_smoke(mnist_dir, tmp_path):
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/gpu.py", "--smoke", "--data-dir", str(mnist_dir), env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["epochs"]) == {"vae", "cvae", "ssvae", "sdgm"}
    for name, epoch in report["epochs"].items():
        assert epoch["steps_per_epoch"] == 3 and epoch["train_epoch_s"] > 0 and epoch["val_epoch_s"] > 0, name
        assert epoch["images_per_s"] == pytest.approx(3 * 128 / epoch["train_epoch_s"], rel=0.01), name
    sdgm = report["sdgm_100_labels"]
    assert sdgm["epochs"] == 1 and 0 <= sdgm["val_error"] <= 100 and 0 <= sdgm["test_error_final"] <= 100
    assert not registry.exists()  # a smoke run measures nothing and records nothing
    figures = load("gpu").recorded(report)  # what a measured run records: each measure by model
    assert figures["train_epoch_s"] == {name: epoch["train_epoch_s"] for name, epoch in report["epochs"].items()}
    assert set(figures["images_per_s"]) == set(figures["precision"]) == set(report["epochs"]) and figures["sdgm_100_labels"] == sdgm


def test_the_gpu_benchmark_without_a_gpu_points_to_smoke():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    result = run_script("benchmarks/gpu.py")
    assert result.returncode == 2 and "no CUDA device here; run with --smoke" in result.stderr


@pytest.mark.slow
def test_throughput_compares_lightning_with_a_plain_loop_and_records_it(mnist_dir, tmp_path):
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/throughput.py", "--models", "vae", "--steps", "4", "--warmup", "1", "--repeats", "1",
                        "--data-dir", str(mnist_dir), env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 0, result.stderr[-3000:]
    vae = json.loads(result.stdout)["models"]["vae"]
    speed = vae["images_per_s"]
    assert min(speed.values()) > 0 and vae["ratio_lightning_to_plain"] == pytest.approx(speed["lightning"] / speed["plain"], abs=1e-3)
    # Lightning's extra time per step, split into parts that add up to it; the guard runs every step
    ms, extra = vae["ms_per_step"], vae["extra_ms_per_step"]
    assert ms["plain"] == pytest.approx(1000 * 128 / speed["plain"], rel=1e-3)
    assert ms["plain"] + sum(extra.values()) == pytest.approx(ms["lightning"], abs=0.05) and extra["guard"] > 0
    record = json.loads(registry.read_text())
    assert record["setting"] == "speed_lightning" and record["figures"]["vae"].startswith(f"{speed['plain']:.0f} / ")
    assert record["figures"]["vae_extra_ms"].startswith(f"{ms['plain']} ms a plain step + guard {extra['guard']} ")


@pytest.mark.parametrize("decay", [None, 0.9])
def test_throughputs_plain_loop_averages_the_weights_as_the_recipe_does(decay, quick_overrides, monkeypatch):
    """With lit.ema_decay the plain loop interpolates every weight towards the trained one after
    each optimizer step, with WeightEMA's decay; without it, never."""
    from vaelab.training.ema import ema_decay

    throughput, weights, lerp = load("throughput"), [], torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda average, current, weight: (weights.append(weight), lerp(average, current, weight)))
    throughput.plain_seconds([*quick_overrides, "model=vae", "data.batch_size=32", f"lit.ema_decay={decay or 'null'}"], warmup=1, steps=2)
    assert weights == ([1 - ema_decay(decay, step) for step in (1, 2, 3)] if decay else [])


def test_throughputs_guard_clock_counts_only_the_guards_calls_since_its_reset():
    """The guard's time of the warm-up steps is left out; the wrapped methods still do their work."""
    throughput = load("throughput")

    class Guard:
        def check_loss(self, loss, metrics, step, epoch):
            time.sleep(0.2)
            return "checked"

        def check_gradients(self, module, optimizer, step, epoch):
            time.sleep(0.02)

        def raise_if_bad(self, metrics, epoch):
            pass

    guard = Guard()
    clock = throughput.GuardClock(guard)
    assert guard.check_loss(None, {}, 0, 0) == "checked" and clock.seconds >= 0.2
    clock.reset()
    guard.check_gradients(None, None, 1, 0)
    guard.raise_if_bad({}, 0)
    assert 0.02 <= clock.seconds < 0.2


def test_pyro_m2_reads_the_epochs_and_validation_accuracies_pyros_example_prints():
    """The lines of ss_vae_M2.py (Pyro 1.9.1) at the end of each epoch, among its other output."""
    lines = [
        (3.0, "UserWarning: some warning"),
        (61.5, "0 epoch: avg losses 120.5 -0.02 99.1 validation accuracy 0.6521 test accuracy 0.6601"),
        (122.0, "1 epoch: avg losses 110.2 -0.01 95.3 validation accuracy 0.7110 test accuracy 0.7003"),
        (130.0, "best validation accuracy 0.7110 corresponding testing accuracy 0.7003 last testing accuracy 0.7003"),
    ]
    assert load("pyro_m2").pyro_epochs(lines) == [(61.5, 0.6521), (122.0, 0.711)]


def test_m2_mnist_never_writes_its_curves_over_an_earlier_records(tmp_path):
    unused_stem = load("m2_mnist").unused_stem
    assert unused_stem(tmp_path, "m2_mnist_100_seed0") == tmp_path / "m2_mnist_100_seed0"
    (tmp_path / "m2_mnist_100_seed0.png").touch()
    assert unused_stem(tmp_path, "m2_mnist_100_seed0") == tmp_path / "m2_mnist_100_seed0_2"
    (tmp_path / "m2_mnist_100_seed0_2.csv").touch()
    assert unused_stem(tmp_path, "m2_mnist_100_seed0") == tmp_path / "m2_mnist_100_seed0_3"
    assert unused_stem(tmp_path, "m2_mnist_100_seed1") == tmp_path / "m2_mnist_100_seed1"


def test_m2_mnist_records_the_labels_alone_as_a_setting_of_their_own():
    """No weight on the unlabeled images is the paper's labels-alone baseline, not a variant of M2."""
    setting_and_variant = load("m2_mnist").setting_and_variant
    assert setting_and_variant("m2", 100, ["objective.unlabeled_weight=0", "data.labeled_batch_size=50"], 0.0) == (
        "m2_mnist_100_labels_alone", "data.labeled_batch_size=50")
    assert setting_and_variant("m2", 100, ["objective.unlabeled_weight=0"], 0) == ("m2_mnist_100_labels_alone", None)
    assert setting_and_variant("sdgm", 100, [], 1.0) == ("sdgm_mnist_100", None)
    assert setting_and_variant("m2", 600, ["objective.unlabeled_weight=0.5"], 0.5) == ("m2_mnist_600", "objective.unlabeled_weight=0.5")


def test_pyro_m2_compares_the_seconds_per_epoch_of_both_runs():
    """Pyro's epochs are timed from the start of both runs; the ratio is Pyro's seconds over vaelab's."""
    epochs = [(60.0, 0.65), (120.0, 0.71), (180.0, 0.70)]
    record = {"id": "abc", "figures": {"seconds_per_epoch": 40.0, "minutes_to_val_acc": {"80": 1.0}}}
    figures = load("pyro_m2").comparison(epochs, record)
    assert figures["pyro_seconds_per_epoch"] == 60.0 and figures["epoch_speed_vs_pyro"] == 1.5
    assert figures["pyro_minutes"] == [1.0, 2.0, 3.0] and figures["pyro_val_acc"] == [65.0, 71.0, 70.0]
    assert figures["vaelab_record"] == "abc" and figures["vaelab_minutes_to_val_acc"] == {"80": 1.0}


def test_pyro_m2_gives_pyros_example_the_largest_batch_it_accepts():
    """The example asserts that its batch divides the labeled count and the 10,000 validation images."""
    batch = load("pyro_m2").pyro_batch_size
    assert [batch(n) for n in (100, 600, 1000, 3000, 50, 30)] == [100, 200, 200, 200, 50, 10]


def test_pyro_m2_stops_at_once_with_the_output_of_an_example_that_fails(mnist_dir, tmp_path):
    """A broken Pyro install ends the comparison in seconds, saying why, and records nothing."""
    example = tmp_path / "examples" / "vae" / "ss_vae_M2.py"
    example.parent.mkdir(parents=True)
    example.write_text('import sys\nprint("ModuleNotFoundError: No module named \'visdom\'")\nsys.exit(3)\n')
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/pyro_m2.py", "--example", str(example), "--minutes", "5", "--data-dir", str(mnist_dir),
                        env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 1 and "exit code 3" in result.stderr and "visdom" in result.stderr
    assert (example.parent / "utils" / ".data" / "MNISTCached" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not registry.exists()


def test_step_profile_takes_the_gemm_rate_in_every_round_beside_the_steps(mnist_dir, tmp_path):
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/step_profile.py", "--model", "vae", "--steps", "2", "--repeats", "3", "--top", "3",
                        "--data-dir", str(mnist_dir), "--variant", "lit.optimizer.fused=null", env={"VAELAB_REGISTRY": str(registry)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    gemm, steps = figures["gemm_gflops_rounds"], figures["ms_per_step_rounds"]
    assert len(gemm) == len(steps["config"]) == len(steps["variant"]) == 3 and figures["gemm_gflops"] == sorted(gemm)[1]
    per_round = [figures["gflop_per_step"] / (ms / 1000) / rate for ms, rate in zip(steps["config"], gemm)]
    assert figures["share_of_gemm_rate_rounds"] == pytest.approx(per_round, rel=0.05)
    record = json.loads(registry.read_text())
    assert record["setting"] == "speed_step_vae" and record["variant"] == "lit.optimizer.fused=null"


def test_pyro_m2_stops_pyros_example_when_vaelabs_run_fails(mnist_dir, tmp_path):
    """A bad override ends the comparison with vaelab's error, without waiting out Pyro's minutes."""
    example = tmp_path / "ss_vae_M2.py"
    example.write_text("import time\ntime.sleep(600)\n")
    registry = tmp_path / "registry.jsonl"
    result = run_script("benchmarks/pyro_m2.py", "--example", str(example), "--minutes", "10", "--data-dir", str(mnist_dir),
                        "model.z_dim=0", env={"VAELAB_REGISTRY": str(registry)}, timeout=120)
    assert result.returncode == 1 and "vaelab's run failed" in result.stderr and "z_dim must be a positive integer" in result.stderr
    assert not registry.exists()
