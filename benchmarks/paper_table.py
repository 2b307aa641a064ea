"""Reproduce published numbers within a time budget and record them in the results registry.

For each chosen experiment: ``python train.py experiment=<row>`` stopped after ``--minutes`` of
training, then ``python evaluate.py`` on the best checkpoint; one registry record per row holds
our figure, epochs, wall times, the machine and both commands. ``python benchmarks/render.py``
puts it beside the published figure (``registry.PUBLISHED``) in the paper comparison.

    python benchmarks/paper_table.py --rows m2_mnist_100 vae_mnist --minutes 30 --iwae-k 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from registry import PUBLISHED, append, shared_option
from vaelab.utils import CONFIG_DIR, checkpoints

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source checkout

# experiment -> (what is compared, the published figure, its source): the settings that are experiments
ROWS = {row: published for row, published in PUBLISHED.items() if (CONFIG_DIR / "experiment" / f"{row}.yaml").is_file()}


def our_figure(row: str, metrics: dict[str, float]) -> float:
    """The figure a row compares: test error in %, the IWAE bound in nats, or the share of samples classified as their class in %."""
    if row.startswith(("m2_", "m1m2_", "adgm_", "sdgm_")):
        return round(100 * (1 - metrics["test/acc"]), 2)
    if row.startswith("vae_mnist"):
        return round(metrics["test/nll_iwae"], 2)
    return round(100 * metrics["test/sample_acc"], 2)


def run(command: list[str]) -> float:
    """Run a command from the repository root; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, cwd=PROJECT_ROOT, check=True)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["m2_mnist_100", "vae_mnist"], choices=sorted(ROWS))
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per row")
    parser.add_argument("--iwae-k", type=int, default=5000, help="importance samples for the VAE's NLL")
    shared_option(parser)
    # one value per flag, so that the overrides after it still reach train.py
    parser.add_argument("--eval", action="append", default=[], help="a Hydra override for evaluate.py only, e.g. eval.iwae_rows=5000 (repeat for more)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py and evaluate.py, e.g. trainer=gpu")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    budget = f"00:{int(args.minutes // 60):02d}:{int(args.minutes % 60):02d}:{round(args.minutes % 1 * 60):02d}"
    for row in args.rows:
        run_dir = Path("outputs") / "benchmarks" / f"paper_{row}_{stamp}"  # relative to the repository root
        train = [sys.executable, "train.py", f"experiment={row}", f"trainer.max_time={budget}", "logger=csv",
                 "test=false", f"hydra.run.dir={run_dir}", *args.overrides]
        train_seconds = run(train)
        best = next((PROJECT_ROOT / run_dir / "checkpoints").glob("epoch_*.ckpt")).relative_to(PROJECT_ROOT)
        iwae_k = args.iwae_k if row.startswith("vae_mnist") else 0  # the other rows compare no likelihood
        evaluate = [sys.executable, "evaluate.py", f"ckpt_path={best}", f"eval.iwae_k={iwae_k}",
                    f"hydra.run.dir={run_dir}/evaluation", *args.overrides, *args.eval]
        eval_seconds = run(evaluate)
        report = json.loads((PROJECT_ROOT / run_dir / "evaluation" / "metrics.json").read_text())
        cfg = OmegaConf.load(PROJECT_ROOT / run_dir / "config.yaml")  # the run's resolved config
        compared = ROWS[row][0]
        figures = {
            "metric": f"test NLL, IWAE k = {iwae_k}, nats" if row.startswith("vae_mnist") else compared,
            "final": None,
            "best": our_figure(row, report["metrics"]),
            "best_by": cfg.optimized_metric,
            "best_labels": cfg.data.val_size if str(cfg.optimized_metric).endswith(("acc", "ce")) else 0,
            "best_epoch": int(best.stem.split("_")[-1]),
            "epochs": checkpoints.read(PROJECT_ROOT / run_dir / "checkpoints" / "last.ckpt")["epoch"] + 1,  # epochs begun
            "minutes": round(train_seconds / 60, 1),
            "eval_minutes": round(eval_seconds / 60, 1),
            "run_dir": str(run_dir),
        }
        record = append(
            "paper_table.py", figures, overrides=args.overrides, precision=str(cfg.trainer.precision), seeds=[int(cfg.seed)],
            split_seeds=[int(cfg.data.split_seed)], budget=f"{args.minutes:g} minutes", shared=args.shared, setting=row,
            variant=" ".join(args.overrides) or None,
            notes="train: " + " ".join(train[1:]) + "; evaluate: " + " ".join(evaluate[1:]),
        )
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
