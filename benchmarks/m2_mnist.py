"""M2 on MNIST with few labels: train within a budget, print seconds/epoch, the validation
accuracy curve and the test error of the best checkpoint (by val/acc) as JSON.

    python benchmarks/m2_mnist.py --labeled 100 --max-minutes 20 [hydra overrides ...]

Published test error with 100 labels: 11.97 % (Kingma et al. 2014, M2).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vaelab.train import train
from vaelab.utils import CONFIG_DIR, PROJECT_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--max-minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. lit.optimizer.lr=1e-3")
    args = parser.parse_args()

    out = PROJECT_ROOT / "outputs" / "benchmarks" / f"m2_mnist_{args.labeled}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    minutes = int(args.max_minutes)
    seconds = round((args.max_minutes - minutes) * 60)
    overrides = [
        "model=ssvae", f"data.labeled={args.labeled}", "logger=csv", "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu",
        f"trainer.max_epochs={args.max_epochs}", f"trainer.max_time=00:00:{minutes:02d}:{seconds:02d}",
        f"paths.output_dir={out}", f"paths.log_dir={out}", "extras.print_config=false",
        *([f"paths.data_dir={args.data_dir}"] if args.data_dir else []), *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start

    with open(Path(out) / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    val_acc = [round(float(r["val/acc"]), 4) for r in rows if r.get("val/acc")]
    epochs = len(val_acc)
    print(
        json.dumps(
            {
                "labeled": args.labeled,
                "epochs": epochs,
                # wall time (training, validation each epoch, the final test) per epoch
                "seconds_per_epoch": round(wall / max(epochs, 1), 1),
                "wall_seconds": round(wall),
                "val_acc_per_epoch": val_acc,
                "best_val_acc": max(val_acc) if val_acc else None,
                "test_error_percent": round(100 * (1 - metrics["test/acc"]), 2),
                "published_test_error_percent": {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}.get(args.labeled),
                "overrides": overrides,
                "hardware": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
                + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
                "date": date.today().isoformat(),
                "run_dir": str(out),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
