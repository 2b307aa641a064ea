"""Command lines of the benchmark scripts."""

from __future__ import annotations

import importlib.util

from conftest import REPO_ROOT


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
