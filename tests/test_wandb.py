"""W&B mode resolution, and an offline run that writes its files and never opens a connection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from vaelab.utils import CONFIG_DIR, resolve_wandb_mode
from vaelab.utils.instantiate import _set_wandb_run
from vaelab.utils.wandb import RUN_ID, summarise_best, wandb_host
from conftest import REPO_ROOT, compose_config


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_mode_is_offline_without_credentials(no_credentials):
    assert resolve_wandb_mode(None) == "offline"


def test_mode_is_online_with_an_api_key(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"


def test_mode_is_online_with_a_netrc_entry_for_the_host_wandb_logs_in_to(no_credentials, tmp_path, monkeypatch):
    """`wandb login` stores the key for wandb's default host, which is not always api.wandb.ai."""
    (tmp_path / "netrc").write_text(f"machine {wandb_host()}\n  login user\n  password " + "x" * 40 + "\n")
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_wandb_mode(None) == "offline"  # a key for another host
    (tmp_path / "netrc").write_text("machine wandb.example.org\n  login user\n  password " + "x" * 40 + "\n")
    assert resolve_wandb_mode(None) == "online"


def test_explicit_mode_and_environment_take_precedence(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    with pytest.raises(ValueError, match="logger.wandb.mode='offlne' is not one of online, offline, disabled"):
        resolve_wandb_mode("offlne")


def wandb_entry(run_dir):
    cfg = compose_config("train", ["logger=wandb", f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}"])
    return cfg.logger.wandb


def test_a_run_directory_logs_to_one_wandb_run_which_a_resumed_run_continues(tmp_path):
    first = wandb_entry(tmp_path / "a")
    _set_wandb_run(first, resume_from=None)
    assert (tmp_path / "a" / RUN_ID).read_text().strip() == first.id and "resume" not in first
    again = wandb_entry(tmp_path / "a")  # resumed in place, or a requeued job
    _set_wandb_run(again, resume_from=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert (again.id, again.resume) == (first.id, "allow")
    elsewhere = wandb_entry(tmp_path / "b")  # resumed into a new run directory
    _set_wandb_run(elsewhere, resume_from=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert (elsewhere.id, elsewhere.resume) == (first.id, "allow")
    assert (tmp_path / "b" / RUN_ID).read_text().strip() == first.id
    fresh = wandb_entry(tmp_path / "c")
    _set_wandb_run(fresh, resume_from=None)
    assert fresh.id != first.id and "resume" not in fresh and fresh.group is None


def test_the_jobs_of_a_multirun_share_a_wandb_group(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.sweep.dir={tmp_path}/2026-11-26_06-00-00_123"], return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        entry = wandb_entry(tmp_path / "0")
        _set_wandb_run(entry, resume_from=None)
        assert entry.group == "2026-11-26_06-00-00_123"
    finally:
        HydraConfig.instance().cfg = None


def test_wandb_summaries_keep_each_validation_metric_at_its_best():
    class Experiment:
        defined = {}

        def define_metric(self, name, summary):
            self.defined[name] = summary

    experiment = Experiment()
    summarise_best(experiment)
    assert experiment.defined["val/acc"] == experiment.defined["val/elbo"] == "max"
    assert experiment.defined["val/bpd"] == experiment.defined["val/nll_iwae"] == "min"


class ConnectionCounter:
    """A local TCP listener standing in for the W&B server: it counts who connects."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.server.close()


@pytest.fixture
def server():
    counter = ConnectionCounter()
    yield counter
    counter.close()


def test_offline_run_writes_wandb_files_without_network_and_a_resumed_run_continues_it(mnist_dir, tmp_path, server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_BASE_URL=f"http://127.0.0.1:{server.port}")
    run_dir = tmp_path / "run"
    common = [
        "logger=wandb", "trainer=cpu", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "extras.print_config=false",
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *common, "trainer.max_epochs=1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert "W&B logs offline (no W&B credentials found)" in result.stdout + result.stderr
    assert "wandb sync" in result.stdout + result.stderr
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/images/samples_*.png"))
    assert (run_dir / "csv" / "metrics.csv").is_file()
    resumed = subprocess.run(
        [sys.executable, "train.py", *common, "trainer.max_epochs=2", f"ckpt_path={run_dir}/checkpoints/last.ckpt"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = (run_dir / RUN_ID).read_text().strip()
    assert sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")) == [run_id, run_id]
    assert server.connections == 0


@pytest.mark.slow
def test_unreachable_server_in_online_mode_falls_back_to_offline(mnist_dir, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]  # nothing listens there once the probe closes
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path), WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port}",
        WANDB_INIT_TIMEOUT="3",
    )
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "train.py", "logger=wandb", "logger.wandb.mode=online", "trainer=cpu",
            f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "extras.print_config=false",
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B logs offline (the online run could not start" in result.stdout + result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "test/elbo" in (run_dir / "csv" / "metrics.csv").read_text()
