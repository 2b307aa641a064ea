"""The GPU path in one command: epoch times and images/s of the VAE, CVAE, M2 and SDGM, then the
SDGM's validation and test error after a time budget with 100 labels.

Every model trains as ``python train.py`` builds it, on the whole dataset held on the GPU
(``data.on_device=true``, batches gathered there) in its config's precision (bf16 mixed for the
semi-supervised models where the device computes bfloat16 natively). An epoch is timed from its
first to its last training step, the second epoch of each model (the first pays for warm-up,
autotuning and compilation); validation is timed on its own. The budgeted SDGM run is
``benchmarks/m2_mnist.py --model sdgm --labeled 100 --max-minutes M``, which appends its own record.
Prints JSON and appends one record to the results registry (``registry.py``).

    python benchmarks/gpu.py                                        # on a GPU: about 10 minutes
    python benchmarks/gpu.py --variant lit.compile=true lit.compile_mode=reduce-overhead
    python benchmarks/gpu.py --smoke                                # any machine: every part, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from registry import append, shared_option
from vaelab.train import build
from vaelab.utils import CONFIG_DIR

warnings.filterwarnings("ignore", ".*does not have many workers.*")

HERE = Path(__file__).resolve().parent
MODELS = {
    "vae": ["model=vae"], "cvae": ["model=cvae"],
    "ssvae": ["model=ssvae", "data.labeled=100"], "sdgm": ["model=sdgm", "data.labeled=100"],
}
# --smoke: a few batches of each split, so every part runs end to end on any machine in seconds
SMOKE = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.val_size=500", "data.eval_batch_size=250"]


class EpochTimer(pl.Callback):
    """Wall time of each training epoch's steps (validation excluded) and of each validation."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._started = 0.0

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":  # the steps are queued: wait for the device before reading the clock
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = self._now(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # validation runs inside the training epoch: the steps end here
            now = self._now(pl_module)
            self.train.append(now - self._started)
            self._started = now

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val.append(self._now(pl_module) - self._started)


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def epoch_time(overrides: list[str]) -> dict[str, float]:
    """Train two epochs as ``train.py`` builds the model; the second epoch's training and
    validation seconds, and training images (unlabeled ones for M2 and SDGM) per second."""
    cfg = compose_run(overrides)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build(cfg, datamodule)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, max_epochs=2,
        limit_train_batches=cfg.trainer.limit_train_batches, limit_val_batches=cfg.trainer.limit_val_batches,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    images = trainer.num_training_batches * cfg.data.batch_size  # per epoch; M2/SDGM: the unlabeled part
    return {
        "train_epoch_s": float(f"{timer.train[-1]:.4g}"),
        "val_epoch_s": float(f"{timer.val[-1]:.4g}"),
        "images_per_s": round(images / timer.train[-1], 1),
        "steps_per_epoch": trainer.num_training_batches,
        "precision": str(cfg.trainer.precision),
    }


def budgeted_sdgm(minutes: float, extra: list[str], smoke: bool, data_dir: str | None) -> dict:
    """``m2_mnist.py --model sdgm --labeled 100`` within ``minutes``; its registry record."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(HERE / "m2_mnist.py"), "--model", "sdgm", "--labeled", "100",
                   "--max-minutes", f"{minutes:g}", *extra]
        env = dict(os.environ)
        if smoke:  # nothing measured: the record and curves go to the temporary directory
            command += ["--max-epochs", "1", "--out-dir", out]
            env["VAELAB_REGISTRY"] = str(Path(out) / "registry.jsonl")
        if data_dir:
            command += ["--data-dir", data_dir]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout[done.stdout.index("{"):])


def recorded(summary: dict) -> dict:
    """The registry's figures of a ``summary``: each measure of the epochs by model, then the
    device and the budgeted SDGM run."""
    epochs = summary["epochs"]
    figures = {"metric": "the second epoch of each model: training s, images/s, validation s",
               **{measure: {name: epoch[measure] for name, epoch in epochs.items()}
                  for measure in next(iter(epochs.values()))},  # epoch_time's figures, in its order
               "device": summary["device"]}
    if "sdgm_100_labels" in summary:
        figures["sdgm_100_labels"] = summary["sdgm_100_labels"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--minutes", type=float, default=8.0, help="the SDGM's training budget (0: skip that run)")
    parser.add_argument("--variant", nargs="+", default=[], help="overrides for every run, e.g. data.batch_size=512")
    parser.add_argument("--smoke", action="store_true", help="a few batches on whatever device there is; records nothing")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    shared_option(parser)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        parser.error("no CUDA device here; run with --smoke to check the script end to end on the CPU")

    device = ["trainer=gpu", "data.on_device=true"] if gpu else ["trainer=cpu"]
    base = [*device, "paths.output_dir=.", *([f"paths.data_dir={args.data_dir}"] if args.data_dir else []),
            *(SMOKE if args.smoke else []), *args.variant]
    epochs = {name: epoch_time([*MODELS[name], *base]) for name in args.models}
    summary: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "variant": args.variant, "epochs": epochs}
    if args.minutes > 0:
        extra = [*(["data.on_device=true"] if gpu else []), *(SMOKE if args.smoke else []), *args.variant]
        minutes = 0.05 if args.smoke else args.minutes
        figures = (sdgm := budgeted_sdgm(minutes, extra, args.smoke, args.data_dir))["figures"]
        summary["sdgm_100_labels"] = {
            "minutes": minutes, "epochs": figures["epochs"],
            "val_error": None if figures["val_acc_last"] is None else round(100 - figures["val_acc_last"], 2),
            "test_error_final": figures["final"], "test_error_best": figures["best"], "record": sdgm.get("id"),
        }
    print(json.dumps(summary, indent=2))
    if not args.smoke:
        append("gpu.py", recorded(summary), overrides=base, precision=None, seeds=[42], split_seeds=[0],
               budget=f"2 epochs per model; SDGM {args.minutes:g} minutes", shared=args.shared,
               variant=" ".join(args.variant) or None, setting="gpu")


if __name__ == "__main__":
    main()
