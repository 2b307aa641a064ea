"""M1+M2: the stacked bound, M1's features, loading M1, and its first stage (vaelab.stages.PretrainM1),
which train.py runs because the model's config declares it."""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import vaelab.stages
import vaelab.train
from vaelab.distributions import standard_normal
from vaelab.elbo import iwae_bound
from vaelab.evaluate import evaluate
from vaelab.lit import LitModel
from vaelab.models import M1M2, VAE
from vaelab.models.m1m2 import active_count, feature_spread
from vaelab.objectives import ELBO
from vaelab.stages import PretrainM1, Stage, time_left
from vaelab.train import train
from vaelab.utils.checkpoints import complete_model_config, load_part, state_mismatch
from conftest import compose_config, run_script

NET = {"type": "mlp", "hidden": [16]}


def tiny(features: int | None = 3) -> M1M2:
    torch.manual_seed(0)
    m2 = {"z_dim": 2, "net": {"type": "mlp", "hidden": [8]}}
    return M1M2((1, 6, 6), num_classes=4, z_dim=5, net=NET, m2=m2, features=features)


def images(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(1))


def save_weights(module: nn.Module, path, prefix: str = "model.", **extra) -> None:
    """A checkpoint holding ``module``'s weights under ``prefix``, as a LitModel's would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"{prefix}{k}": v for k, v in module.state_dict().items()}, **extra}, path)


@pytest.mark.parametrize("labeled", [False, True])
def test_the_stacked_bound_is_its_definition(labeled):
    """bound(x[, y]) = log p(x|z1) + B(z1[kept]) + log N(z1[rest]) - log q(z1|x) at one z1 ~ q(z1|x),
    B being M2's L(h, y) or U(h) on the kept dimensions; ``kl`` is z2's KL (M2's), ``kl_z1`` the rest."""
    model, x = tiny(), images()
    model.kept.copy_(torch.tensor([0, 2, 4]))
    y = torch.arange(6) % 4 if labeled else None
    torch.manual_seed(3)
    terms = model.bound(x, y)
    torch.manual_seed(3)
    qz1 = model.m1.encode(x)
    z1 = qz1.sample()
    top = model.m2.bound(z1[:, [0, 2, 4]].view(6, 3, 1, 1), y)
    rest = z1[:, [1, 3]]
    expected = model.m1.decode(z1).log_prob(x) + top.elbo + standard_normal(rest).log_prob(rest) - qz1.log_prob(z1)
    torch.testing.assert_close(terms.elbo, expected)
    torch.testing.assert_close(terms.recon, model.m1.decode(z1).log_prob(x))
    torch.testing.assert_close(terms.kl, top.kl)
    torch.testing.assert_close(terms.recon - terms.extras["kl_z1"], terms.elbo)
    assert ("entropy" in terms.extras) != labeled and terms.name == "elbo"


def test_importance_weights_bound_log_px_and_tighten_with_k():
    model, x = tiny(), images(4)
    with torch.no_grad():
        elbo = torch.stack([model.bound(x).elbo for _ in range(200)]).mean(0)
        weights = torch.cat([model.log_weights(x, None, 500) for _ in range(4)])
    assert weights.shape == (2000, 4)
    k5 = iwae_bound(weights.view(400, 5, 4).transpose(0, 1)).mean(0)  # L_5, averaged over 400 draws
    assert (iwae_bound(weights) > k5).all() and (k5 > elbo).all()
    with pytest.raises(ValueError, match="DReG estimator is not defined"):
        model.log_weights(x, None, 2, dreg=True)


def test_features_are_drawn_afresh_in_training_and_the_posterior_mean_in_evaluation():
    model, x = tiny(features=None), images()
    model.train()
    assert not torch.equal(model.classify(x), model.classify(x))
    model.eval()
    mean = model.m1.encode(x).mean
    torch.testing.assert_close(model.classify(x), model.m2.classify(mean.view(6, 5, 1, 1)))
    assert not any(p.requires_grad for p in model.m1.parameters())  # M1 stays as trained


def test_keep_active_keeps_the_dimensions_whose_posterior_means_vary_most():
    model, x = tiny(features=2), images(50)
    spread = feature_spread(model.m1, x)
    means = model.m1.encode(x).mean
    torch.testing.assert_close(spread, means.std(0))
    model.keep_active(spread)
    assert model.kept.tolist() == sorted(means.std(0).argsort(descending=True)[:2].tolist())
    assert active_count(torch.tensor([0.9, 0.05, 0.3, 0.1])) == 2 and active_count(torch.zeros(3)) == 1


def test_sampling_decodes_with_m2_then_m1():
    model = tiny()
    model.kept.copy_(torch.tensor([1, 2, 3]))
    torch.manual_seed(5)
    drawn = model.sample(3, y=2)
    torch.manual_seed(5)
    h = model.m2.sample(3, 2).flatten(1)
    z1 = torch.zeros(3, 5)
    z1[:, 1:4] = h
    torch.testing.assert_close(drawn, model.m1.decode(z1).mean)
    model.eval()  # h = M1's posterior mean, M2's reconstruction of it, decoded by M1
    reconstructed = model.reconstruct(images(3))
    h = model.m1.encode(images(3)).mean[:, model.kept].view(3, 3, 1, 1)
    z1 = torch.zeros(3, 5)
    z1[:, 1:4] = model.m2.reconstruct(h).flatten(1)
    torch.testing.assert_close(reconstructed, model.m1.decode(z1).mean)


def test_m1_checkpoints_are_checked_before_they_load(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="stages.m1.ckpt=.*absent.ckpt does not exist"):
        load_part(tmp_path / "absent.ckpt", model.m1, "model.", "stages.m1.ckpt")
    with pytest.raises(IsADirectoryError, match="stages.m1.ckpt=.* is a directory; give a checkpoint file in it"):
        load_part(tmp_path, model.m1, "model.", "stages.m1.ckpt")
    save_weights(VAE((1, 6, 6), z_dim=7, net=NET), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="stages.m1.ckpt=.*other.ckpt does not hold the VAE that the configuration describes .*other shape"):
        load_part(tmp_path / "other.ckpt", model.m1, "model.", "stages.m1.ckpt")
    before = {k: v.clone() for k, v in model.m1.state_dict().items()}
    same = VAE((1, 6, 6), z_dim=5, net=NET)
    save_weights(same, tmp_path / "same.ckpt")
    load_part(tmp_path / "same.ckpt", model.m1, "model.", "stages.m1.ckpt")
    torch.testing.assert_close(model.m1.state_dict(), same.state_dict())
    assert any(not torch.equal(before[k], v) for k, v in same.state_dict().items())
    # M1 from an M1+M2 run's checkpoint: its weights are under model.m1.
    save_weights(tiny(), tmp_path / "m1m2.ckpt")
    other = VAE((1, 6, 6), z_dim=5, net=NET)
    load_part(tmp_path / "m1m2.ckpt", other, "model.m1.", "stages.m1.ckpt")
    torch.testing.assert_close(other.state_dict(), tiny().m1.state_dict())


def test_a_checkpoint_gives_the_model_config_its_run_chose(tmp_path):
    """The number of features a run chose is kept in its checkpoint's model config and set in the
    config that rebuilds the model where that leaves it open (null); a configured value is kept
    (resume_model_config refuses the difference), and checkpoints without a model config, or
    unreadable ones (left to check_checkpoint), change nothing."""
    torch.save({"state_dict": {}, "hyper_parameters": {"model_config": {"features": 7, "z_dim": 40}}}, tmp_path / "run.ckpt")
    for configured, expected in ((None, 7), (3, 3)):
        cfg = OmegaConf.create({"model": {"features": configured, "z_dim": 50}})
        assert complete_model_config(cfg, str(tmp_path / "run.ckpt")) == {"features": 7, "z_dim": 40}
        assert cfg.model.features == expected and cfg.model.z_dim == 50
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "vae.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for path in ("vae.ckpt", "notes.ckpt", "absent.ckpt"):
        cfg = OmegaConf.create({"model": {"features": None}})
        complete_model_config(cfg, str(tmp_path / path))
        assert cfg.model.features is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="model.features must be between 1 and z_dim"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, features=6)
    with pytest.raises(ValueError, match="model.m2.likelihood must be normal"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, m2={"likelihood": "bernoulli"})
    with pytest.raises(ValueError, match="model.m2.net must be an mlp"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, m2={"net": {"type": "conv"}})
    with pytest.raises(ValueError, match="stages.m1.epochs must be a positive integer, got 0"):
        PretrainM1(epochs=0)


def test_stage_two_gets_what_is_left_of_the_time_budget():
    assert time_left("00:01:00:00", 1500.4) == "00:00:34:59"
    assert time_left({"days": 1, "minutes": 1}, 90) == "00:23:59:30"
    assert time_left("00:00:01:00", 600) == "00:00:00:01"


def test_stage_one_trains_m1_with_its_own_objective(quick_overrides):
    """M1 trains with lit.optimizer and stages.m1.objective, as a VAE of every training image
    with M1's settings, the autoregressive decoder's too: stage 2 loads stage 1's weights."""
    stages = []
    cfg = compose_config(
        "train",
        [*quick_overrides, "experiment=m1m2_mnist_100", "stages.m1.objective.kl_warmup_steps=7", "lit.optimizer.lr=3e-4",
         "model.autoregressive=[16]", "stages.m1.epochs=3"],
    )
    stage = hydra.utils.instantiate(cfg.stages.m1, _recursive_=False)
    assert isinstance(stage, PretrainM1) and stage.ckpt is None
    stage.train_m1(cfg, stages.append)
    (m1,) = stages
    assert m1.model._target_ == "vaelab.models.VAE" and m1.data.labeled is None and m1.stages is None
    assert m1.trainer.max_epochs == 3 and m1.paths.output_dir == f"{cfg.paths.output_dir}/m1" and not m1.test
    assert m1.lit.optimizer.lr == 3e-4 and "gradient_clip_val" not in m1.lit  # M2's lit settings stay with stage 2
    module = vaelab.train.build(m1, hydra.utils.instantiate(m1.data))
    assert isinstance(module.objective, ELBO) and module.objective.kl_warmup_steps == 7  # not M2's objective
    both = hydra.utils.instantiate(cfg.model)
    assert not state_mismatch(module.model.state_dict(), both.m1.state_dict())
    assert both.m1.made.layers[0].out_features == 16
    assert both.likelihood_description.endswith("autoregressive over the pixels (masked hidden layers [16])")


def two_active_dimensions(m1: VAE) -> None:
    """Only the first two dimensions of z1 have posterior means that vary with the image."""
    head = [layer for layer in m1.encoder.modules() if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        head.weight[2 : m1.z_dim] = 0
        head.bias[2 : m1.z_dim] = 0
        head.weight[:2] *= 10


@pytest.fixture
def m1m2_config(tmp_path):
    return compose_config("train", [
        f"paths.output_dir={tmp_path}", "model=m1m2", "data.labeled=100", "model.z_dim=6", "model.net.hidden=[16]",
        "model.m2.z_dim=2", "model.m2.net.hidden=[8]", "trainer.max_time=00:00:10:00", "stages.m1.epochs=2",
    ])


def fake_data(n: int = 200) -> SimpleNamespace:
    """What a stage reads from a datamodule: the training images, and the facts build() reads."""
    x = torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(train_inputs=lambda: x, binary=True, labeled=100, train_size=1000)


def test_the_stage_trains_m1_then_chooses_the_active_features_and_rebuilds_the_module(m1m2_config, tmp_path):
    """PretrainM1.run: stage 1 as a training run of its own into <run>/m1, its weights loaded into
    M1, the active dimensions of z1 chosen on the training images, the module rebuilt for their
    number (kept in its checkpoints' model_config) and M2 left what remains of trainer.max_time."""
    cfg, data = m1m2_config, fake_data()
    build = lambda c, **options: vaelab.train.build(c, data, **options)  # noqa: E731
    runs, trained = [], {}

    def train_m1(stage_cfg):
        runs.append(stage_cfg)
        torch.manual_seed(1)
        trained["m1"] = hydra.utils.instantiate(stage_cfg.model)
        two_active_dimensions(trained["m1"])
        save_weights(trained["m1"], tmp_path / "m1" / "checkpoints" / "last.ckpt")
        time.sleep(1.5)
        return {}

    module = build(cfg)
    assert module.model.kept.tolist() == list(range(6))  # features=null: all, until the stage chooses
    stage = hydra.utils.instantiate(cfg.stages.m1, _recursive_=False)
    chosen = stage.run(cfg, module, data, train_m1, build)
    (m1_run,) = runs
    assert m1_run.paths.output_dir == str(tmp_path / "m1") and m1_run.trainer.max_epochs == 2
    assert chosen is not module and isinstance(chosen, LitModel)
    assert cfg.model.features == 2 and chosen.hparams.model_config["features"] == 2
    assert chosen.model.kept.tolist() == [0, 1] and chosen.model.m2.input_shape == (2, 1, 1)
    torch.testing.assert_close(chosen.model.m1.state_dict(), trained["m1"].state_dict())
    left = sum(int(v) * s for v, s in zip(cfg.trainer.max_time.split(":"), (86400, 3600, 60, 1)))
    assert 590 <= left <= 599  # stage 1 took its share of the ten minutes


def test_a_given_m1_is_loaded_and_a_given_number_of_features_keeps_the_module(m1m2_config, tmp_path):
    cfg, data = m1m2_config, fake_data()
    cfg.model.features = 2
    build = lambda c, **options: vaelab.train.build(c, data, **options)  # noqa: E731
    torch.manual_seed(2)
    m1 = VAE((1, 28, 28), z_dim=6, net={"type": "mlp", "hidden": [16]})
    two_active_dimensions(m1)
    save_weights(m1, tmp_path / "vae.ckpt")
    module = build(cfg)
    stage = PretrainM1(epochs=5, ckpt=str(tmp_path / "vae.ckpt"))
    never = lambda stage_cfg: pytest.fail("stage 1 ran although stages.m1.ckpt was given")  # noqa: E731
    assert stage.run(cfg, module, data, never, build) is module
    assert module.model.kept.tolist() == [0, 1] and cfg.trainer.max_time == "00:00:10:00"
    torch.testing.assert_close(module.model.m1.state_dict(), m1.state_dict())
    assert not (tmp_path / "m1").exists()


class RecordingStage(Stage):
    """A stage declared by config alone (``+stages.probe._target_=test_m1m2.RecordingStage``)."""

    seen: list = []

    def run(self, cfg, module, datamodule, train, build):
        rebuilt = build(cfg, model_config={"probe": True})
        RecordingStage.seen.append((module, datamodule, train, rebuilt, {k: v.clone() for k, v in rebuilt.state_dict().items()}))
        return rebuilt


def test_train_runs_the_stages_a_config_declares_and_trains_the_module_they_return(quick_overrides, tmp_path):
    """train.py knows no model: it runs each entry under stages: in order and trains what the last returns."""
    source = inspect.getsource(vaelab.train)
    assert not any(name in source for name in ("M1M2", "m1m2", "PretrainM1", "m1_", "features"))
    RecordingStage.seen.clear()
    train(compose_config("train", [*quick_overrides, "debug=fdr", "+stages.probe._target_=test_m1m2.RecordingStage"]))
    ((built, datamodule, given_train, rebuilt, before),) = RecordingStage.seen
    assert isinstance(built.model, VAE) and built is not rebuilt and given_train is vaelab.train.train
    assert datamodule.binary and rebuilt.hparams.model_config == {"probe": True}
    assert rebuilt.global_step == 1  # fast_dev_run's one step trained the stage's module
    assert any(not torch.equal(before[k], v) for k, v in rebuilt.state_dict().items())
    RecordingStage.seen.clear()
    elsewhere = [o.replace(str(tmp_path), str(tmp_path / "test_only")) for o in quick_overrides]
    train(compose_config("train", [*elsewhere, "debug=fdr", "train=false", "+stages.probe._target_=test_m1m2.RecordingStage"]))
    assert not RecordingStage.seen  # stages prepare training; a run that only tests skips them


def test_the_m1m2_stage_runs_from_config_and_its_feature_count_is_kept(quick_overrides, tmp_path, monkeypatch, mnist_dir):
    """model=m1m2 stages.m1.epochs=1 through train(): M1 trains into <run>/m1, M2 on the chosen
    features, whose number the checkpoint keeps (model_config); a resumed run and evaluate.py,
    whose configs leave model.features open, rebuild the model with that number."""
    small = [
        "model=m1m2", "data.labeled=100", "model.z_dim=8", "model.net.hidden=[32]", "model.m2.z_dim=4",
        "model.m2.net.hidden=[16]", "stages.m1.epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "test=false",
    ]
    monkeypatch.setattr(vaelab.stages, "active_count", lambda spread: 3)  # an M1 this short: every dimension is active
    cfg = compose_config("train", [*quick_overrides, *small, "trainer.max_epochs=1"])
    saved = cfg.copy()
    train(cfg)
    m1_path = tmp_path / "m1" / "checkpoints" / "last.ckpt"
    m1 = torch.load(m1_path, weights_only=True)
    assert m1["hyper_parameters"]["model"] == "VAE" and m1["epoch"] == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    stage2 = torch.load(last, weights_only=True)
    assert stage2["hyper_parameters"]["model_config"]["features"] == 3 and len(stage2["state_dict"]["model.kept"]) == 3
    assert stage2["hyper_parameters"]["model"] == "M1M2"
    for key, value in m1["state_dict"].items():  # M2 trained on the M1 of stage 1, which stayed frozen
        torch.testing.assert_close(stage2["state_dict"][key.replace("model.", "model.m1.", 1)], value)

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(saved, tmp_path / ".hydra" / "config.yaml")  # as Hydra writes it: model.features=null
    assert saved.model.features is None
    overrides = [
        f"paths.data_dir={mnist_dir}", f"paths.output_dir={tmp_path / 'eval'}", "logger=csv", "trainer=cpu",
        "extras.print_config=false", f"ckpt_path={last}", "eval.iwae_k=2", "eval.sample_quality=false",
        "eval.n_latent=100", "data.eval_batch_size=100", "trainer.limit_test_batches=1",
    ]
    metrics = evaluate(compose_config("evaluate", overrides), overrides)
    assert {"test/acc", "test/nll_iwae", "test/elbo", "test/kl_z1"} <= set(metrics)
    assert metrics["test/nll_iwae"] > 0

    written = m1_path.stat().st_mtime_ns
    train(compose_config("train", [*quick_overrides, *small, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1 and len(resumed["state_dict"]["model.kept"]) == 3
    assert m1_path.stat().st_mtime_ns == written  # a resumed run does not run its stages again
    # ... and its checkpoints keep the number too, for the next resume or evaluation
    assert resumed["hyper_parameters"]["model_config"]["features"] == 3

@pytest.mark.slow
def test_the_two_stage_command_trains_evaluates_and_reuses_m1(quick_overrides, tmp_path, monkeypatch):
    """experiment=m1m2_mnist_100 on an MNIST subset: stage 1 trains M1 into <run>/m1, stage 2 M2
    on its active features, whose number the checkpoint keeps; evaluate.py reloads the final
    checkpoint with its config leaving that number open; stages.m1.ckpt= skips stage 1."""
    small = [
        "experiment=m1m2_mnist_100", "stages.m1.epochs=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=20", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    ]
    monkeypatch.setattr(vaelab.stages, "active_count", lambda spread: 7)  # an M1 this short has no inactive dimensions
    metrics = train(compose_config("train", [*quick_overrides, *small]))
    m1 = tmp_path / "m1" / "checkpoints" / "last.ckpt"
    assert m1.is_file() and {"val/acc", "test/acc", "val/elbo"} <= set(metrics)
    assert metrics["val/elbo"] < 0
    stage2 = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    m1_weights = torch.load(m1, weights_only=True)["state_dict"]
    torch.testing.assert_close(stage2["state_dict"]["model.m1.encoder.head.0.weight"], m1_weights["model.encoder.head.0.weight"])
    assert len(stage2["state_dict"]["model.kept"]) == 7 and stage2["hyper_parameters"]["model_config"]["features"] == 7

    result = run_script(
        "evaluate.py", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", quick_overrides[0],  # paths.data_dir
        "model=m1m2", "model.net.hidden=[600,600]", "model.net.activation=softplus", "data.labeled=100",
        f"paths.output_dir={tmp_path / 'eval'}", "eval.iwae_k=2", "data.eval_batch_size=500", "trainer.limit_test_batches=1",
        "eval.classifier_epochs=1",
    )  # the model is named: train() ran without Hydra, so the run has no .hydra/config.yaml to restore
    assert result.returncode == 0, result.stderr[-3000:]
    report = OmegaConf.load(tmp_path / "eval" / "metrics.json")
    assert report.model == "M1M2" and report.metrics["test/nll_iwae"] > 0

    again = tmp_path / "again"
    overrides = [o.replace(str(tmp_path), str(again)) for o in quick_overrides]
    train(compose_config("train", [*overrides, *small, f"stages.m1.ckpt={m1}"]))
    assert not (again / "m1").exists()
    reused = torch.load(again / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(reused["model.m1.encoder.head.0.weight"], m1_weights["model.encoder.head.0.weight"])
