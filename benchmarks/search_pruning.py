"""An Optuna search with pruning against the same search without: trials finished, pruned and
failed, wall time, and the best value each found.

Both run ``python train.py -m hparams_search=ssvae_optuna`` (M2, 100 labels, the search space of
``src/vaelab/conf/hparams_search/ssvae_optuna.yaml``, its sampler seed) with short trials: one
epoch of ``--steps`` training steps, validated ``--validations`` times on ``--val-batches``
batches. One search keeps the default pruner (median rule), the other has ``pruner=null``. Each
study goes to its own SQLite file under a temporary directory. Prints JSON and appends it to the
results registry (``registry.py``).

    VAELAB_DATA_DIR=../shared/data python benchmarks/search_pruning.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from registry import append, shared_option

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def search(name: str, directory: Path, args: argparse.Namespace, *overrides: str) -> dict:
    storage = f"sqlite:///{directory}/{name}.db"
    command = [
        sys.executable, "train.py", "-m", "hparams_search=ssvae_optuna", f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}", f"hydra.sweeper.n_trials={args.trials}", f"paths.log_dir={directory}",
        "logger=csv", "callbacks.images=null", "extras.print_config=false", "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.steps}", f"+trainer.val_check_interval={args.steps // args.validations}",
        f"trainer.limit_val_batches={args.val_batches}", "trainer.limit_test_batches=2", *overrides,
    ]
    if args.data_dir:
        command.append(f"paths.data_dir={args.data_dir}")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state.name.lower() for t in study.trials]
    best = study.best_trial
    return {
        "command": " ".join(command[1:]),
        "seconds": round(seconds, 1),
        "trials": {state: states.count(state) for state in sorted(set(states))},
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "training_steps": sum(max(t.intermediate_values, default=0) for t in study.trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial")
    parser.add_argument("--validations", type=int, default=4, help="validations (pruning points) per trial")
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches (of 500 images) each time")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    shared_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "with_pruning": search("pruned", Path(tmp), args),
            "without_pruning": search("unpruned", Path(tmp), args, "hydra.sweeper.pruner=null"),
        }
    with_, without = results["with_pruning"], results["without_pruning"]
    results["time_ratio"] = round(with_["seconds"] / without["seconds"], 3)
    print(json.dumps(results, indent=2))
    results["metric"] = f"{args.trials}-trial Optuna search of M2, 100 labels"
    append("search_pruning.py", results, budget=f"{args.steps} steps a trial, {args.validations} validations", shared=args.shared,
           setting="search_pruning", split_seeds=[0])


if __name__ == "__main__":
    main()
