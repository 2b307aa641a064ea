"""Every config group option composes, and what it builds instantiates."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from vaelab.train import build
from vaelab.utils import CONFIG_DIR, instantiate_callbacks, instantiate_loggers
from conftest import REPO_ROOT, compose_config


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def test_groups_have_the_documented_options():
    assert {"default", "cpu", "gpu", "ddp", "ddp_sim", "mps"} <= set(options("trainer"))
    assert {"slurm", "local"} <= set(options("hydra/launcher")) and {"ssvae_optuna"} <= set(options("hparams_search"))
    assert {"wandb", "csv", "tensorboard", "many"} <= set(options("logger"))
    assert {"mnist"} <= set(options("data")) and {"vae"} <= set(options("model"))


@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("model", options("model"))
def test_model_and_data_instantiate(model, data, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, f"model={model}", f"data={data}", "train=false"])
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    assert tuple(module.model.input_shape) == datamodule.input_shape
    assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)
    assert len(instantiate_callbacks(cfg.callbacks)) == len(cfg.callbacks)


@pytest.mark.parametrize("likelihood", options("likelihood"))
@pytest.mark.parametrize("net", options("net"))
def test_every_net_and_likelihood_builds_every_model(net, likelihood, quick_overrides):
    for model in options("model"):
        cfg = compose_config("train", [*quick_overrides, f"model={model}", f"net={net}", f"likelihood={likelihood}"])
        built = hydra.utils.instantiate(cfg.model)
        assert built.likelihood.type == likelihood
        z, y = torch.zeros(2, built.z_dim), torch.zeros(2, dtype=torch.long)
        px = built.decode(z) if model == "vae" else built.decode(z, y)
        assert px.mean.shape == (2, *cfg.data.input_shape)


def net_and_likelihood(overrides: list[str]) -> tuple[str, str]:
    cfg = compose_config("train", overrides)
    return cfg.model.net.type, cfg.model.likelihood.type


def test_data_picks_net_and_likelihood_unless_told_otherwise(quick_overrides):
    assert net_and_likelihood(quick_overrides) == ("mlp", "bernoulli")
    assert net_and_likelihood([*quick_overrides, "data=svhn"]) == ("conv", "logistic")
    assert net_and_likelihood([*quick_overrides, "data=svhn", "net=mlp", "likelihood=gaussian"]) == ("mlp", "gaussian")
    assert net_and_likelihood([*quick_overrides, "net=conv"]) == ("conv", "bernoulli")


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainers_instantiate(trainer, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, f"trainer={trainer}"])
    available = {"gpu": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if available.get(cfg.trainer.accelerator, cfg.trainer.devices) < cfg.trainer.devices:
        pytest.skip(f"{cfg.trainer.devices} {cfg.trainer.accelerator} device(s) wanted, fewer here; the config composed")
    assert hydra.utils.instantiate(cfg.trainer, logger=False).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate_with_csv_always(logger, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, f"logger={logger}"])  # W&B: WANDB_MODE=disabled
    loggers = instantiate_loggers(cfg.logger)
    names = {type(lg).__name__ for lg in loggers}
    assert "CSVLogger" in names
    assert len(loggers) == len(cfg.logger)


PRESETS = [f"debug={name}" for name in options("debug")] + [f"experiment={name}" for name in options("experiment")]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_resolve(preset, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, preset])
    OmegaConf.resolve(cfg)
    hydra.utils.instantiate(cfg.trainer, logger=False)


def test_evaluate_config_composes(quick_overrides):
    cfg = compose_config("evaluate", [*quick_overrides, "ckpt_path=some.ckpt"])
    assert cfg.ckpt_path == "some.ckpt" and cfg.task_name == "evaluate"


def test_cli_prints_a_complete_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "--resolve", f"paths.data_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model.input_shape == cfg.data.input_shape == [1, 28, 28]
    assert cfg.data.data_dir == str(tmp_path)
    assert {"data", "model", "trainer", "logger", "callbacks", "paths", "seed"} <= set(cfg)


@pytest.mark.parametrize("model", options("model"))
def test_nonpositive_latent_size_is_rejected(model, quick_overrides):
    cfg = compose_config("train", [*quick_overrides, f"model={model}", "model.z_dim=0"])
    with pytest.raises(Exception, match="model.z_dim must be a positive integer, got 0"):
        hydra.utils.instantiate(cfg.model)


@pytest.mark.parametrize("flags, precision", [({"avx2", "avx512_bf16"}, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"), ({"avx2", "avx512f"}, "32-true")])
def test_m2_trains_in_bf16_only_where_the_cpu_has_it(flags, precision, quick_overrides, monkeypatch):
    """model=ssvae picks bf16 mixed precision on a CPU that computes bfloat16 natively and float32
    on one that would emulate it; a command-line precision wins, other models and evaluation keep float32."""
    import vaelab.utils.resolvers

    monkeypatch.setattr(vaelab.utils.resolvers, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    m2 = [*quick_overrides, "model=ssvae", "data.labeled=100"]
    assert compose_config("train", m2).trainer.precision == precision
    assert compose_config("train", [*m2, "trainer.precision=32-true"]).trainer.precision == "32-true"
    assert compose_config("train", quick_overrides).trainer.precision == "32-true"
    assert compose_config("evaluate", [*m2, "ckpt_path=some.ckpt"]).trainer.precision == "32-true"


@pytest.mark.parametrize("cap, precision", [("AVX2", "32-true"), ("avx512_core", "32-true"), ("AVX512_CORE_BF16", "bf16-mixed"),
                                            ("AVX512_CORE_AMX", "bf16-mixed"), ("ALL", "bf16-mixed")])
def test_a_onednn_cap_below_bf16_makes_m2_train_in_float32(cap, precision, quick_overrides, monkeypatch):
    """ONEDNN_MAX_CPU_ISA capped below AVX512-BF16 (as to emulate an older CPU) leaves bfloat16
    emulated, 14x slower than float32: model=ssvae then picks float32 on a CPU that has bf16."""
    import vaelab.utils.resolvers

    monkeypatch.setattr(vaelab.utils.resolvers, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert compose_config("train", [*quick_overrides, "model=ssvae", "data.labeled=100"]).trainer.precision == precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from vaelab.utils.resolvers import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()
