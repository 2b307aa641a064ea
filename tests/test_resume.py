"""Resuming from last.ckpt continues exactly where the interrupted run stopped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vaelab.train import train
from conftest import compose_config


def run(overrides: list[str], out: Path, epochs: int, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
    cfg = compose_config(
        "train",
        [
            *overrides, f"paths.output_dir={out}", f"trainer.max_epochs={epochs}", "test=false",
            "trainer.limit_train_batches=8", "trainer.limit_val_batches=2", "data.batch_size=32",
            *([f"ckpt_path={ckpt}"] if ckpt else []),
        ],
    )
    train(cfg)
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [["model=vae"], ["model=ssvae", "data.labeled=100", "data.labeled_batch_size=20"], ["model=vae", "lit.ema_decay=0.9"]],
    ids=["vae", "ssvae", "vae-ema"],
)
def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(model, quick_overrides, tmp_path):
    overrides = [*quick_overrides, *model]
    whole = run(overrides, tmp_path / "whole", epochs=3)
    first = run(overrides, tmp_path / "part", epochs=2)
    resumed = run(overrides, tmp_path / "resumed", epochs=3, ckpt=tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert first["epoch"] == 1 and resumed["epoch"] == whole["epoch"] == 2
    assert resumed["global_step"] == whole["global_step"]
    for name, value in whole["state_dict"].items():  # with lit.ema_decay the average, and the weights beside it
        assert torch.equal(resumed["state_dict"][name], value), name
        if "current_model_state" in whole:
            assert torch.equal(resumed["current_model_state"][name], whole["current_model_state"][name]), name
    assert any(not torch.equal(first["state_dict"][name], value) for name, value in whole["state_dict"].items())


def test_a_resumed_run_trains_with_the_configured_optimizer_settings_and_says_so(quick_overrides, tmp_path, caplog):
    """Lightning restores the optimizer's lr from the checkpoint; the configuration wins."""
    run([*quick_overrides, "lit.optimizer.lr=1e-3"], tmp_path / "first", epochs=1)
    with caplog.at_level(logging.INFO, logger="vaelab.lit"):
        resumed = run([*quick_overrides, "lit.optimizer.lr=1e-4", "+lit.optimizer.weight_decay=0.5"], tmp_path / "resumed",
                      epochs=2, ckpt=tmp_path / "first" / "checkpoints" / "last.ckpt")
    group = resumed["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 0.5)
    assert "lr 0.0001 (checkpoint: 0.001)" in caplog.text and "weight_decay 0.5 (checkpoint: 0)" in caplog.text
