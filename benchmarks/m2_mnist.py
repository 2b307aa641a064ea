"""M2 (or M1+M2, ADGM, SDGM: ``--model m1m2|adgm|sdgm``) on MNIST with few labels: train within a budget, then report the test error of the final
checkpoint and of the best one by ``optimized_metric`` (with how many labeled validation images
chose it), the accuracy on the run's own unlabeled images, seconds per epoch, and curves of
accuracy, entropy and information of q(y|x) against steps and minutes (PNG and CSV).

    python benchmarks/m2_mnist.py --labeled 100 --max-minutes 60 --split-seed 0 [hydra overrides ...]
    python benchmarks/m2_mnist.py --labeled 100 --max-minutes 60 objective.unlabeled_weight=0   # labels alone
    python benchmarks/m2_mnist.py --model m1m2 --labeled 100 --max-minutes 60 model.features=20
    python benchmarks/m2_mnist.py --model sdgm --labeled 100 --max-minutes 60

The figures are printed as JSON and appended to the results registry (``registry.py``) with the
published figure of the setting (``registry.PUBLISHED``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure

from registry import PUBLISHED, append, shared_option
from vaelab.data.split import balanced_split
from vaelab.train import build, train
from vaelab.utils import CONFIG_DIR

NAMES = {"ssvae": ("m2", "M2"), "m1m2": ("m1m2", "M1+M2"), "adgm": ("adgm", "ADGM"), "sdgm": ("sdgm", "SDGM")}  # in file names, in figure titles

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source checkout


def setting_and_variant(stem: str, labeled: int, overrides: list[str], unlabeled_weight: float) -> tuple[str, str | None]:
    """A run's registry setting and variant (its overrides). Without weight on the unlabeled
    images the run is the labels-alone baseline, ``<stem>_mnist_<N>_labels_alone``: the override
    that makes it so names the setting and is no variant of it."""
    labels_alone = unlabeled_weight == 0
    if labels_alone:
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "objective.unlabeled_weight"]
    return f"{stem}_mnist_{labeled}{'_labels_alone' if labels_alone else ''}", " ".join(overrides) or None


def unused_stem(directory: Path, name: str) -> Path:
    """``directory / name``, or with the first suffix _2, _3, ... that no curve file (.png, .csv)
    there has yet: an earlier record's curves are never overwritten."""
    stem, n = directory / name, 1
    while stem.with_suffix(".png").exists() or stem.with_suffix(".csv").exists():
        n += 1
        stem = directory / f"{name}_{n}"
    return stem


def curves(rows: list[dict], path: Path, title: str) -> None:
    """Validation accuracy against minutes and steps; entropy and information of q(y|x) against minutes."""
    val = [r for r in rows if r.get("val/acc")]
    minutes = [float(r["time/minutes"]) for r in val]
    figure = Figure(figsize=(15, 4.2))
    left, middle, right = figure.subplots(1, 3)
    left.plot(minutes, [100 * float(r["val/acc"]) for r in val], marker=".")
    left.set(xlabel="minutes of training", ylabel="validation accuracy, %", title=title)
    middle.plot([int(r["step"]) for r in val], [100 * float(r["val/acc"]) for r in val], marker=".")
    middle.set(xlabel="optimizer steps", ylabel="validation accuracy, %")
    for key, label in (("val/entropy", "H(q(y|x)), validation"), ("val/mi", "I(x; y) under q, validation"), ("val/kl_y", "KL(q(y|x) || p(y))")):
        if val and val[0].get(key):
            right.plot(minutes, [float(r[key]) for r in val], label=label)
    right.set(xlabel="minutes of training", ylabel="nats")
    right.legend(fontsize="small")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def unlabeled_accuracy(module, datamodule) -> float:
    """Accuracy of q(y|x) on the run's unlabeled training images (their labels were hidden from it)."""
    _, unlabeled = balanced_split(datamodule.train_set.labels, datamodule.labeled, datamodule.num_classes, datamodule.split_seed)
    images = datamodule.prepare_eval_images(datamodule.train_set.images[unlabeled])
    labels = datamodule.train_set.labels[unlabeled]
    module.eval()
    with torch.no_grad():
        hits = sum(
            int((module.model.classify(datamodule.preprocess((x, y), train=False)[0]).argmax(-1) == y).sum())
            for x, y in zip(images.split(1000), labels.split(1000))
        )
    return hits / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssvae", choices=list(NAMES), help="M2, M1+M2 (both stages within the budget), ADGM or SDGM")
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--split-seed", type=int, default=0, help="which labeled examples (data.split_seed)")
    parser.add_argument("--max-epochs", type=int, default=10_000)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results", help="where the curves go")
    shared_option(parser)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. lit.optimizer.lr=1e-3")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    stem, title = NAMES[args.model]
    name = f"{stem}_mnist_{args.labeled}_seed{args.split_seed}"
    out = PROJECT_ROOT / "outputs" / "benchmarks" / f"{name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    minutes = int(args.max_minutes)
    seconds = round((args.max_minutes - minutes) * 60)
    overrides = [
        f"model={args.model}", f"data.labeled={args.labeled}", f"data.split_seed={args.split_seed}", "logger=csv",
        "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu", "test=false",
        f"trainer.max_epochs={args.max_epochs}", f"trainer.max_time=00:{minutes // 60:02d}:{minutes % 60:02d}:{seconds:02d}",
        f"paths.output_dir={out}", f"paths.log_dir={out}", "extras.print_config=false", "callbacks.images=null",
        *([f"paths.data_dir={args.data_dir}"] if args.data_dir else []), *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start

    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    tester = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="auto", devices=1)
    checkpoints = out / "checkpoints"
    best = next(checkpoints.glob("epoch_*.ckpt"))
    errors = {}
    for which, path in (("best", best), ("final", checkpoints / "last.ckpt")):
        metrics = tester.test(module, datamodule=datamodule, ckpt_path=str(path), verbose=False)[0]
        errors[which] = round(100 * (1 - metrics["test/acc"]), 2)
    unlabeled = unlabeled_accuracy(module, datamodule)  # the final weights, loaded last

    with open(out / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    val = [r for r in rows if r.get("val/acc")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figure = unused_stem(args.out_dir, name).with_suffix(".png")
    curves(rows, figure, f"{title}, {args.labeled} labels, split seed {args.split_seed}")
    with open(figure.with_suffix(".csv"), "w", newline="") as file:
        keys = ["epoch", "step", "time/minutes", "val/acc", "val/elbo", "val/entropy", "val/mi", "val/kl_y"]
        writer = csv.DictWriter(file, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(val)
    selection = cfg.optimized_metric
    setting, variant = setting_and_variant(stem, args.labeled, args.overrides, cfg.objective.get("unlabeled_weight"))
    figures = {
        "metric": "test error, %",
        "final": errors["final"],
        "best": errors["best"],
        "best_by": selection,
        "best_labels": cfg.data.val_size if selection.endswith(("acc", "ce")) else 0,
        "best_checkpoint": best.name,
        "epochs": len(val),
        "seconds_per_epoch": round(wall / max(len(val), 1), 1),  # training and validation
        "minutes": round(wall / 60, 1),
        "unlabeled_accuracy": round(100 * unlabeled, 2),
        "val_acc_last": round(100 * float(val[-1]["val/acc"]), 2) if val else None,
        # minutes of training (validation included) until the validation accuracy first reached each level
        "minutes_to_val_acc": {f"{level}": next((round(float(r["time/minutes"]), 1) for r in val if float(r["val/acc"]) >= level / 100), None)
                               for level in (80, 85, 88, 90, 95)},
        "test_inputs": "binarized once (data.split_seed)" if cfg.data.get("binarize") else "8-bit",
        "curves": str(figure.relative_to(PROJECT_ROOT)) if figure.is_relative_to(PROJECT_ROOT) else str(figure),
        "run_dir": str(out),
    }
    record = append(
        "m2_mnist.py", figures, overrides=overrides, precision=str(cfg.trainer.precision), seeds=[int(cfg.seed)],
        split_seeds=[args.split_seed], budget=f"{args.max_minutes:g} minutes" + (f", at most {args.max_epochs} epochs" if args.max_epochs < 10_000 else ""),
        shared=args.shared, setting=setting, variant=variant,
        notes=f"published: {PUBLISHED[setting][1]} % ({PUBLISHED[setting][2]})" if setting in PUBLISHED else None,
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
