"""Reproduce published numbers within a time budget and write a markdown table.

For each chosen experiment: ``python train.py experiment=<row>`` stopped after
``--minutes`` of training, then ``python evaluate.py`` on the best checkpoint; the table holds
our figure beside the published one, epochs, wall time, hardware, date and the commands.

    python benchmarks/paper_table.py --rows m2_mnist_100 vae_mnist --minutes 30 --iwae-k 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vaelab.utils import checkpoints

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source checkout

# experiment -> (what is compared, the published figure, its source)
ROWS = {
    "m2_mnist_100": ("test error, %", 11.97, "Kingma et al. 2014, M2"),
    "m2_mnist_600": ("test error, %", 4.94, "Kingma et al. 2014, M2"),
    "m2_mnist_1000": ("test error, %", 3.60, "Kingma et al. 2014, M2"),
    "m2_mnist_3000": ("test error, %", 3.92, "Kingma et al. 2014, M2"),
    "vae_mnist": ("test NLL (IWAE bound), nats", 86.76, "Burda et al. 2016, VAE, 1 stochastic layer"),
    "vae_mnist_iwae5": ("test NLL (IWAE bound), nats", 85.54, "Burda et al. 2016, IWAE k = 5, 1 stochastic layer"),
    "vae_mnist_iwae50": ("test NLL (IWAE bound), nats", 84.78, "Burda et al. 2016, IWAE k = 50, 1 stochastic layer"),
    "vae_mnist_planar": ("test NLL (IWAE bound), nats", None, "Rezende & Mohamed 2015 report a bound with other networks"),
    "vae_mnist_iaf": ("test NLL (IWAE bound), nats", None, "Kingma et al. 2016 report convolutional models"),
    "vae_mnist_ar": ("test NLL (IWAE bound), nats", None, "goal: <= 85 with 1 stochastic layer"),
    "cvae_mnist": ("samples classified as their class, %", None, "goal: >= 98"),
    "m2_svhn_1000": ("test error, %", 36.02, "Kingma et al. 2014, M1+M2"),
    "m1m2_mnist_100": ("test error, %", 3.33, "Kingma et al. 2014, M1+M2"),
    "m1m2_svhn_1000": ("test error, %", 36.02, "Kingma et al. 2014, M1+M2"),
    "adgm_mnist_100": ("test error, %", 0.96, "Maaloe et al. 2016, ADGM"),
    "sdgm_mnist_100": ("test error, %", 1.32, "Maaloe et al. 2016, SDGM"),
    "sdgm_svhn_1000": ("test error, %", 16.61, "Maaloe et al. 2016, SDGM"),
}


def our_figure(row: str, metrics: dict[str, float]) -> float:
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
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "paper_table.md")
    # one value per flag, so that the overrides after it still reach train.py
    parser.add_argument("--eval", action="append", default=[], help="a Hydra override for evaluate.py only, e.g. eval.iwae_rows=5000 (repeat for more)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py and evaluate.py, e.g. trainer=gpu")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    budget = f"00:{int(args.minutes // 60):02d}:{int(args.minutes % 60):02d}:{round(args.minutes % 1 * 60):02d}"
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    lines = [
        f"Produced by `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`.",
        "",
        f"Measured {date.today().isoformat()} on {hardware}, training budget {args.minutes:g} minutes per row "
        f"(trainer.max_time={budget})" + (f"; vae_mnist NLL with IWAE k = {args.iwae_k}." if any(r.startswith("vae_mnist") for r in args.rows) else "."),
        "",
        "| experiment | compared | ours | published | source | epochs | train + eval wall time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
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
        epochs = checkpoints.read(PROJECT_ROOT / run_dir / "checkpoints" / "last.ckpt")["epoch"] + 1  # epochs begun
        compared, published, source = ROWS[row]
        lines.append(
            f"| `{row}` | {compared} | {our_figure(row, report['metrics'])} | {published if published is not None else '-'} "
            f"| {source} | {epochs} (best: {best.stem}) | {train_seconds / 60:.1f} + {eval_seconds / 60:.1f} min |"
        )
        commands += [" ".join(train[1:]), " ".join(evaluate[1:])]
    lines += ["", "Commands (from the repository root, `python` first):", "", "```", *commands, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
