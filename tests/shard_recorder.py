"""A callback for the multi-node test: each process writes the dataset indices its training
samplers hand it in the first epoch (``<directory>/rank<r>.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class ShardRecorder(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            return
        loaders = trainer.train_dataloader  # {"labeled": DataLoader, "unlabeled": DataLoader}
        shards = {name: [int(i) for i in loader.sampler] for name, loader in loaders.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(shards))
