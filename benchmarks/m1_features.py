"""How much an M1 (a ``model=vae`` run) leaves for M2 to find: the active dimensions of its
features (posterior means whose standard deviation over the training images exceeds 0.1, as
``model=m1m2`` keeps them), the test accuracy of a 1-nearest-neighbour classifier on the features
of ``--labeled`` balanced labels, and the test accuracy of an MLP (one hidden layer of 500)
trained on the features of every training label (the training split of the last of
``--split-seeds``), a ceiling for any classifier that reads them. Prints JSON and appends it to
the results registry (``registry.py``).

    python benchmarks/m1_features.py <run>/checkpoints/last.ckpt --labeled 100 --split-seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf, open_dict

import vaelab.utils  # noqa: F401  (registers the resolvers of saved run configs)
from vaelab.data.split import balanced_split
from vaelab.models.m1m2 import ACTIVE_SPREAD, M1_SETTINGS, active_count, posterior_means
from vaelab.utils.checkpoints import OWN_TARGETS, check_targets, load_part
from registry import append, shared_option


def features(model, datamodule, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of q(z1|x) for evaluation images (``prepare_eval_images``)."""
    return posterior_means(model, datamodule.preprocess((images, None), train=False)[0])


def nearest_neighbour_accuracy(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> float:
    nearest = torch.cat([torch.cdist(batch, train).argmin(1) for batch in test.split(1000)])
    return float((labels[nearest] == test_labels).float().mean())


def supervised_accuracy(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, epochs: int) -> float:
    """Test accuracy of an MLP trained on every training feature with its label (Adam 1e-3, batches of 256)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(train.shape[1], 500), torch.nn.ReLU(), torch.nn.Linear(500, int(labels.max()) + 1))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(256):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(train[batch]), labels[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        return float((net(test).argmax(1) == test_labels).float().mean())


def run_config(checkpoint: Path):
    """The config of the run that wrote ``checkpoint``: a ``model=vae`` run, or stage 1 of an
    M1+M2 run (``<run>/m1/checkpoints``, whose M1 settings are the M1+M2 run's)."""
    run = checkpoint.resolve().parent.parent
    for saved in (run / ".hydra" / "config.yaml", run.parent / ".hydra" / "config.yaml"):
        if saved.is_file():
            cfg = OmegaConf.load(saved)
            for section in ("model", "data"):  # built below: only vaelab's classes
                check_targets(cfg.get(section), OWN_TARGETS, str(saved), section, option=None)
            if cfg.model._target_ in ("vaelab.models.VAE", "vaelab.models.M1M2") and cfg.model.get("num_classes") in (None, cfg.data.num_classes):
                return cfg
            raise ValueError(f"{checkpoint} belongs to a {cfg.model._target_} run; give the checkpoint of an M1 (a model=vae run, or <m1m2 run>/m1/checkpoints/last.ckpt).")
    raise FileNotFoundError(f"No run config (.hydra/config.yaml) beside {checkpoint}; give a checkpoint in <run>/checkpoints/ of a train.py run.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a model=vae run's checkpoint, <run>/checkpoints/*.ckpt")
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the supervised MLP")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    shared_option(parser)
    args = parser.parse_args()

    cfg = run_config(args.checkpoint)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    settings = {key: model_cfg.get(key) for key in M1_SETTINGS}
    model = hydra.utils.instantiate({"_target_": "vaelab.models.VAE", "_convert_": "all", **settings})
    load_part(args.checkpoint, model, "model.", "checkpoint")
    model.eval()

    report = {"checkpoint": str(args.checkpoint), "active_dimensions": None, "nearest_neighbour_test_accuracy": {}, "supervised_test_accuracy": {}}
    for seed in args.split_seeds:  # each split seed also draws its own validation split
        with open_dict(cfg):
            cfg.data.labeled, cfg.data.split_seed = None, seed
            if args.data_dir:
                cfg.data.data_dir = args.data_dir
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_labels, test_labels = datamodule.train_set.labels, datamodule.test_set.labels
        train = features(model, datamodule, datamodule.prepare_eval_images(datamodule.train_set.images))
        test = features(model, datamodule, datamodule.test_set.images)
        spread = train.std(0)
        active = spread > ACTIVE_SPREAD
        report["active_dimensions"] = f"{active_count(spread)} of {len(spread)}"
        labeled, _ = balanced_split(train_labels, args.labeled, datamodule.num_classes, seed)
        report["nearest_neighbour_test_accuracy"][f"{args.labeled} labels, split seed {seed}"] = round(
            nearest_neighbour_accuracy(train[labeled][:, active], train_labels[labeled], test[:, active], test_labels), 4
        )
    for name, columns in (("active dimensions", active), ("all dimensions", torch.ones_like(active))):
        report["supervised_test_accuracy"][name] = round(
            supervised_accuracy(train[:, columns], train_labels, test[:, columns], test_labels, args.epochs), 4
        )
    print(json.dumps(report, indent=2))
    report["metric"] = "supervised ceiling on M1's active features, %"
    append("m1_features.py", report, split_seeds=args.split_seeds, budget=f"{args.epochs} epochs of the supervised MLP",
           shared=args.shared, setting="m1_features")


if __name__ == "__main__":
    main()
