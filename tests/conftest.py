"""Shared fixtures: where the real MNIST files are, and composed configs for quick runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vaelab.data.mnist import FILE_NAMES
from vaelab.utils import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout: train.py, benchmarks/

# Tests never reach W&B's servers; tests that exercise W&B set their own mode.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

def _has_mnist(data_dir: Path) -> bool:
    return all((data_dir / "MNIST" / "raw" / name).is_file() for name in FILE_NAMES)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """A directory holding MNIST/raw/: $VAELAB_DATA_DIR (which must hold it when set),
    else ../shared/data or data/ beside the repository; skip when there is none."""
    configured = os.environ.get("VAELAB_DATA_DIR")
    if configured:
        if not _has_mnist(Path(configured)):
            pytest.fail(f"VAELAB_DATA_DIR={configured} holds no MNIST/raw/ with {FILE_NAMES}.")
        return Path(configured)
    for candidate in (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "data"):
        if _has_mnist(candidate):
            return candidate
    pytest.skip("MNIST files not found; set VAELAB_DATA_DIR to a directory holding MNIST/raw/.")


def run_script(script: str, *overrides: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <script> <overrides>`` from the repository root, capturing its output;
    ``env`` adds to this process's environment."""
    return subprocess.run(
        [sys.executable, script, *overrides],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def quick_overrides(mnist_dir: Path, tmp_path: Path) -> list[str]:
    """Overrides for a small CPU run writing into tmp_path, with the CSV logger only."""
    return [
        f"paths.data_dir={mnist_dir}",
        f"paths.output_dir={tmp_path}",
        f"paths.log_dir={tmp_path}",
        "logger=csv",
        "trainer=cpu",
        "extras.print_config=false",
    ]
