"""M1+M2: the stacked bound, M1's features, loading M1, and the two-stage command."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

import vaelab.train

from vaelab.elbo import iwae_bound
from vaelab.distributions import standard_normal
from vaelab.models import M1M2, VAE
from vaelab.models.m1m2 import active_count, feature_spread
from vaelab.train import time_left, train
from vaelab.utils.checkpoint import settings_from_checkpoint, state_mismatch
from conftest import compose_config, run_script

NET = {"type": "mlp", "hidden": [16]}


def tiny(features: int | None = 3) -> M1M2:
    torch.manual_seed(0)
    m2 = {"z_dim": 2, "net": {"type": "mlp", "hidden": [8]}}
    return M1M2((1, 6, 6), num_classes=4, z_dim=5, net=NET, m2=m2, features=features)


def images(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 1, 6, 6), 0.3), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("labeled", [False, True])
def test_the_stacked_bound_is_its_definition(labeled):
    """bound(x[, y]) = log p(x|z1) + B(z1[kept]) + log N(z1[rest]) - log q(z1|x) at one z1 ~ q(z1|x),
    B being M2's L(h, y) or U(h) on the kept dimensions."""
    model, x = tiny(), images()
    model.kept.copy_(torch.tensor([0, 2, 4]))
    y = torch.arange(6) % 4 if labeled else None
    torch.manual_seed(3)
    terms = model.bound(x, y)
    torch.manual_seed(3)
    qz1 = model.m1.encode(x)
    z1 = qz1.sample()
    top = model.m2.bound(z1[:, [0, 2, 4]].view(6, 3, 1, 1), y).elbo
    rest = z1[:, [1, 3]]
    expected = model.m1.decode(z1).log_prob(x) + top + standard_normal(rest).log_prob(rest) - qz1.log_prob(z1)
    torch.testing.assert_close(terms.elbo, expected)
    torch.testing.assert_close(terms.recon - terms.kl, terms.elbo)
    assert ("entropy" in terms.extras) != labeled


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
    assert model.reconstruct(images(3)).shape == (3, 1, 6, 6)


def test_m1_checkpoints_are_checked_before_they_load(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="model.m1_ckpt=.*absent.ckpt does not exist"):
        model.load_m1(tmp_path / "absent.ckpt")
    other = VAE((1, 6, 6), z_dim=7, net=NET)
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="does not hold the M1 that model.z_dim, net= and likelihood= describe"):
        model.load_m1(tmp_path / "other.ckpt")
    same = VAE((1, 6, 6), z_dim=5, net=NET)
    torch.save({"state_dict": {f"model.{k}": v for k, v in same.state_dict().items()}}, tmp_path / "same.ckpt")
    model.load_m1(tmp_path / "same.ckpt")
    torch.testing.assert_close(model.m1.state_dict(), same.state_dict())


def test_a_checkpoint_fills_in_the_number_of_features_its_config_left_open(tmp_path):
    state = {"state_dict": {"model.kept": torch.arange(7)}}
    torch.save(state, tmp_path / "run.ckpt")
    cfg = OmegaConf.create({"model": {"features": None}})
    settings_from_checkpoint(cfg, str(tmp_path / "run.ckpt"))
    assert cfg.model.features == 7
    given = OmegaConf.create({"model": {"features": 3}})
    settings_from_checkpoint(given, str(tmp_path / "run.ckpt"))
    assert given.model.features == 3


def test_settings_are_checked():
    with pytest.raises(ValueError, match="model.features must be between 1 and z_dim"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, features=6)
    with pytest.raises(ValueError, match="model.m2.likelihood must be normal"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, m2={"likelihood": "bernoulli"})
    with pytest.raises(ValueError, match="model.m2.net must be an mlp"):
        M1M2((1, 6, 6), 4, z_dim=5, net=NET, m2={"net": {"type": "conv"}})


def test_stage_two_gets_what_is_left_of_the_time_budget():
    assert time_left("00:01:00:00", 1500.4) == "00:00:34:59"
    assert time_left({"days": 1, "minutes": 1}, 90) == "00:23:59:30"
    assert time_left("00:00:01:00", 600) == "00:00:00:01"


def test_stage_one_trains_m1_with_its_own_lit_settings(quick_overrides, monkeypatch):
    stages = []
    monkeypatch.setattr(vaelab.train, "train", stages.append)
    cfg = compose_config(
        "train",
        [*quick_overrides, "experiment=m1m2_mnist_100", "model.m1_lit.kl_warmup_steps=7", "lit.optimizer.lr=3e-4", "model.autoregressive=[16]"],
    )
    vaelab.train.train_m1(cfg)
    (stage,) = stages
    assert stage.model._target_ == "vaelab.models.VAE" and stage.data.labeled is None
    assert stage.lit.kl_warmup_steps == 7 and stage.lit.optimizer.lr == 3e-4
    assert "alpha" not in stage.lit  # M2's settings stay with stage 2
    module = vaelab.train.build(stage, hydra.utils.instantiate(stage.data))
    assert module.kl_warmup_steps == 7
    # M1's settings, the autoregressive decoder's too, are the same in both stages: stage 2 loads stage 1's weights
    both = hydra.utils.instantiate(cfg.model)
    assert not state_mismatch(module.model.state_dict(), both.m1.state_dict())
    assert both.m1.made.layers[0].out_features == 16
    assert both.likelihood_description.endswith("autoregressive over the pixels (masked hidden layers [16])")


@pytest.mark.slow
def test_the_two_stage_command_trains_evaluates_and_reuses_m1(quick_overrides, tmp_path, monkeypatch):
    """experiment=m1m2_mnist_100 on an MNIST subset: stage 1 trains M1 into <run>/m1, stage 2 M2
    on its active features, whose number the checkpoint keeps; evaluate.py reloads the final
    checkpoint with its config leaving that number open; model.m1_ckpt= skips stage 1."""
    small = [
        "experiment=m1m2_mnist_100", "model.m1_epochs=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=20", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    ]
    monkeypatch.setattr(vaelab.train, "active_count", lambda spread: 7)  # an M1 this short has no inactive dimensions
    metrics = train(compose_config("train", [*quick_overrides, *small]))
    m1 = tmp_path / "m1" / "checkpoints" / "last.ckpt"
    assert m1.is_file() and {"val/acc", "test/acc", "val/elbo"} <= set(metrics)
    assert metrics["val/elbo"] < 0
    stage2 = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    m1_weights = torch.load(m1, weights_only=True)["state_dict"]
    torch.testing.assert_close(stage2["model.m1.encoder.head.0.weight"], m1_weights["model.encoder.head.0.weight"])
    assert len(stage2["model.kept"]) == 7

    result = run_script(
        "evaluate.py", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", quick_overrides[0],  # paths.data_dir
        "model=m1m2", "model.net.hidden=[600,600]", "model.net.activation=softplus", "data.labeled=100",
        f"paths.output_dir={tmp_path / 'eval'}", "eval.iwae_k=2", "data.eval_batch_size=500", "trainer.limit_test_batches=1",
    )  # the model is named: train() ran without Hydra, so the run has no .hydra/config.yaml to restore
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()

    again = tmp_path / "again"
    overrides = [o.replace(str(tmp_path), str(again)) for o in quick_overrides]
    train(compose_config("train", [*overrides, *small, f"model.m1_ckpt={m1}"]))
    assert not (again / "m1").exists() and (again / "checkpoints" / "last.ckpt").is_file()
