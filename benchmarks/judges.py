"""How much the sample-quality figure of a class-conditional model depends on its judge: trains
the judge of ``vaelab.classifier`` once for each of ``--epochs`` and ``--seeds`` and lets each
score the same samples of one checkpoint (``--per-class`` per class, drawn with one seed): its
accuracy on real test images beside the share of ``sample(n, y=c)`` it assigns to class c, the
figure ``evaluate.py`` reports as ``test/sample_acc``. Where better judges give the same share,
the samples, not the judge, set it. Prints JSON and appends it to the results registry
(``registry.py``).

    python benchmarks/judges.py <run>/checkpoints/last.ckpt --epochs 1 3 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import vaelab.utils  # noqa: F401  (registers the resolvers of saved run configs)
from vaelab.classifier import build_classifier, real_image_data, sample_accuracy
from vaelab.utils.checkpoints import OWN_TARGETS, check_targets, load_part
from registry import append, shared_option


def run_config(checkpoint: Path):
    """The config of the train.py run that wrote ``checkpoint`` (``<run>/checkpoints/*.ckpt``);
    its model and data, which this script builds, may name only vaelab's classes."""
    saved = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"No run config ({saved}) beside {checkpoint}; give a checkpoint in <run>/checkpoints/ of a train.py run.")
    cfg = OmegaConf.load(saved)
    for section in ("model", "data"):
        check_targets(cfg.get(section), OWN_TARGETS, str(saved), section, option=None)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a class-conditional run's checkpoint, <run>/checkpoints/*.ckpt")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10], help="training epochs of each judge")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of each judge's training")
    parser.add_argument("--per-class", type=int, default=1000, help="samples per class (eval.samples_per_class)")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="train each judge on this many batches an epoch (a quick check)")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    parser.add_argument("--setting", default="cvae_mnist_judges", help="where the record goes in the results tables")
    shared_option(parser)
    args = parser.parse_args()

    cfg = run_config(args.checkpoint)
    if args.data_dir:
        cfg.paths.data_dir = args.data_dir
    model = hydra.utils.instantiate(cfg.model)
    if not model.num_classes:
        raise ValueError(f"{args.checkpoint} holds a model that draws no class-conditional samples ({cfg.model._target_}); give a CVAE's or M2's checkpoint.")
    load_part(args.checkpoint, model, "model.", "checkpoint")
    model.eval()
    datamodule = real_image_data(cfg.data)

    judges = {}
    with tempfile.TemporaryDirectory() as scratch:
        for epochs in args.epochs:
            for seed in args.seeds:
                pl.seed_everything(seed)
                start = time.perf_counter()
                judge, accuracy = build_classifier(datamodule, Path(scratch) / f"judge-{epochs}-{seed}.pt", epochs, args.limit_train_batches)
                seconds = time.perf_counter() - start
                torch.manual_seed(0)  # every judge scores the same samples
                shares = sample_accuracy(model, judge, args.per_class)
                name = f"{epochs} epochs, seed {seed}"
                judges[name] = {
                    "real_acc": round(100 * accuracy, 2), "sample_acc": round(100 * float(shares.mean()), 2),
                    "per_class": [round(100 * float(share), 1) for share in shares], "train_s": round(seconds, 1),
                }
                print(json.dumps({name: judges[name]}), flush=True)
    figures = {
        "metric": "samples classified as their class, % (by judges of these real-test accuracies, %)",
        "judges": {name: f"{judge['real_acc']:g} / {judge['sample_acc']:g}" for name, judge in judges.items()},
        "per_class": {name: judge["per_class"] for name, judge in judges.items()},
        "judge_train_s": {name: judge["train_s"] for name, judge in judges.items()},
        "samples_per_class": args.per_class,
        "checkpoint": str(args.checkpoint),
    }
    record = append(
        "judges.py", figures, precision=str(cfg.trainer.precision), seeds=args.seeds, split_seeds=[int(cfg.data.split_seed)],
        budget=f"judges of {', '.join(map(str, args.epochs))} epochs", shared=args.shared,
        setting=args.setting,
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
