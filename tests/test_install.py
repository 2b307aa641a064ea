"""A non-editable install (what `pip install .` or a wheel gives) trains from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_an_installed_vaelab_trains_from_an_empty_directory(mnist_dir, tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ beside pyproject.toml
    shutil.copytree(REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    where = subprocess.run([sys.executable, "-c", "import vaelab; print(vaelab.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(site)), where  # the installed copy, not the source checkout
    result = subprocess.run(
        [str(site / "bin" / "vaelab-train"), "debug=fdr", "logger=csv", f"paths.data_dir={mnist_dir}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((work / "outputs" / "debug" / "runs").iterdir())  # outputs under the working directory
    assert len(runs) == 1 and (runs[0] / "config.yaml").is_file()
    assert not (site / "outputs").exists()
