"""Training throughput of each model under Lightning versus a plain PyTorch loop.

Both train the same model (built from the same Hydra config) on the same MNIST batches in one
process with the same loss (``LitModel.loss``, the objective's), alternating rounds so machine noise hits both
alike. The first ``--warmup`` steps of every run are not timed. Lightning runs as
``python train.py`` does (CSV logging, rich progress bar) minus validation and checkpoints, and
also bare (no logger, no progress bar); the plain loop runs in the same precision (autocast for
bf16-mixed), clips gradients and averages the weights (``lit.ema_decay``) as the recipe does. M2 (ssvae), ADGM and SDGM train with 100 labels. Prints JSON: images/s
(unlabeled images for the semi-supervised models) and the ratios, per model, and M2's step time over the VAE's.
``--variant`` adds a Lightning run with more overrides to the same rounds (e.g.
``lit.compile=true`` or ``trainer.precision=bf16-mixed``) and reports its speed-up over the default Lightning run.
Where Lightning's step is longer, it says what the extra time goes to: the finiteness guard that
``vaelab.lit.LitModel`` runs around each step (timed in the Lightning runs), Lightning's own loop
and hooks (bare minus plain minus the guard), and the CSV logger and progress bar (as run minus bare).
Appends one record to the results registry (``registry.py``).

    python benchmarks/throughput.py --steps 300 --repeats 3 [--models vae cvae ssvae adgm sdgm]
    python benchmarks/throughput.py --models vae ssvae --variant lit.compile=true
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from itertools import chain

import hydra
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.loggers import CSVLogger

from registry import append, shared_option
from vaelab import train
from vaelab.training.ema import ema_decay
from vaelab.utils import CONFIG_DIR

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class StepTimer(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, guard_clock: GuardClock) -> None:
        self.warmup, self.guard_clock = warmup, guard_clock
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
            self.guard_clock.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


class GuardClock:
    """Wall time spent in the module's finiteness guard (``vaelab.training.guard``) since the last
    ``reset()``: its methods are wrapped in place."""

    def __init__(self, guard) -> None:
        self.seconds = 0.0
        for name in ("check_loss", "check_gradients", "raise_if_bad"):
            setattr(guard, name, self._timed(getattr(guard, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def reset(self) -> None:
        self.seconds = 0.0


def build(overrides: list[str]):
    """The datamodule, LightningModule and progress bar that ``python train.py`` would build."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    progress_bar = hydra.utils.instantiate(cfg.callbacks.rich_progress_bar, console_kwargs={"stderr": True})  # stdout: the JSON alone
    return datamodule, train.build(cfg, datamodule), progress_bar, cfg.trainer.precision


def lightning_seconds(overrides: list[str], warmup: int, steps: int, product: bool) -> tuple[float, float]:
    """Seconds of the timed steps, and of the guard within them."""
    datamodule, model, progress_bar, precision = build(overrides)
    timer = StepTimer(warmup, GuardClock(model.guard))
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision=precision,
            max_steps=warmup + steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=CSVLogger(out, name="csv") if product else False,
            enable_progress_bar=product,
            callbacks=[timer, progress_bar] if product else [timer],
        )
        trainer.fit(model, datamodule=datamodule)
    return timer.end - timer.start, timer.guard_clock.seconds


def plain_seconds(overrides: list[str], warmup: int, steps: int) -> float:
    datamodule, model, _, precision = build(overrides)
    bf16 = str(precision).startswith("bf16")  # as Lightning's bf16-mixed: autocast around the loss
    clip = model.stepping.gradient_clip_val
    datamodule.setup("fit")
    model.configure_model()
    optimizer = model.configure_optimizers()
    # the recipe's moving average of the weights, one fused interpolation a step as WeightEMA's
    current = [t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()] if model.ema else []
    average = [t.detach().clone() for t in current]
    model.train()
    step, start = 0, 0.0
    while step < warmup + steps:
        for batch in datamodule.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            if isinstance(batch, tuple) and isinstance(batch[0], dict):  # CombinedLoader: (batch, index, loader)
                batch = batch[0]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model.loss(datamodule.preprocess_batch(batch, train=True))
            optimizer.zero_grad()
            loss.backward()
            if clip:  # the recipe's clipping, as a plain loop would do it
                torch.nn.utils.clip_grad_norm_(model.model.parameters(), clip)
            optimizer.step()
            step += 1
            if average:
                torch._foreach_lerp_(average, current, 1.0 - ema_decay(model.ema.decay, step))
            if step == warmup + steps:
                break
    return time.perf_counter() - start


MODEL_OVERRIDES = {
    "vae": ["model=vae"], "cvae": ["model=cvae"], "ssvae": ["model=ssvae", "data.labeled=100"],
    "adgm": ["model=adgm", "data.labeled=100"], "sdgm": ["model=sdgm", "data.labeled=100"],
}


def measure(overrides: list[str], args) -> tuple[dict[str, list[float]], list[float]]:
    """Images/s of each way of training, one value per round, and the guard's ms per step in
    each bare Lightning run."""
    order = ["plain", "lightning", "lightning_bare"] + (["lightning_variant"] if args.variant else [])
    runs: dict[str, list[float]] = {name: [] for name in order}
    guard_ms: list[float] = []
    for round_ in range(args.repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            if name == "plain":
                seconds = plain_seconds(overrides, args.warmup, args.steps)
            elif name == "lightning_variant":
                seconds, _ = lightning_seconds([*overrides, *args.variant], args.warmup, args.steps, product=True)
            else:
                seconds, guard = lightning_seconds(overrides, args.warmup, args.steps, product=name == "lightning")
                if name == "lightning_bare":
                    guard_ms.append(1000 * guard / args.steps)
            runs[name].append(args.steps * args.batch_size / seconds)
    return runs, guard_ms


def where_the_time_goes(ms: dict[str, float], guard_ms: float) -> dict[str, float]:
    """Lightning's extra ms per step over the plain loop, split: the guard, Lightning's own loop
    and hooks (bare - plain - guard), the CSV logger and progress bar (as run - bare)."""
    return {
        "guard": round(guard_ms, 2),
        "lightning_loop": round(ms["lightning_bare"] - ms["plain"] - guard_ms, 2),
        "logger_and_bar": round(ms["lightning"] - ms["lightning_bare"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vae", "cvae", "ssvae"], choices=list(MODEL_OVERRIDES),
                        help="default: the three quick ones (adgm and sdgm take most of an hour on 2 cores)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (Lightning, plain)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    parser.add_argument("--variant", nargs="+", default=[], help="overrides of an extra Lightning run, e.g. lit.compile=true")
    shared_option(parser)
    args = parser.parse_args()

    results = {}
    for model in args.models:
        overrides = [*MODEL_OVERRIDES[model], f"data.batch_size={args.batch_size}", "paths.output_dir=."]
        if args.data_dir:
            overrides.append(f"paths.data_dir={args.data_dir}")
        runs, guard_ms = measure(overrides, args)
        median = {name: statistics.median(values) for name, values in runs.items()}
        ms = {name: 1000 * args.batch_size / value for name, value in median.items()}
        results[model] = {
            "images_per_s": {name: round(value, 1) for name, value in median.items()},
            "ms_per_step": {name: round(value, 2) for name, value in ms.items()},
            "extra_ms_per_step": where_the_time_goes(ms, statistics.median(guard_ms)),
            "images_per_s_runs": {name: [round(v, 1) for v in values] for name, values in runs.items()},
            "ratio_lightning_to_plain": round(median["lightning"] / median["plain"], 3),
            "ratio_lightning_bare_to_plain": round(median["lightning_bare"] / median["plain"], 3),
        }
        if args.variant:
            results[model]["ratio_variant_to_lightning"] = round(median["lightning_variant"] / median["lightning"], 3)
    summary = {
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "variant": args.variant,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "models": results,
    }
    if {"vae", "ssvae"} <= set(results):
        plain = {name: results[name]["images_per_s"]["plain"] for name in ("vae", "ssvae")}
        summary["ssvae_step_time_over_vae"] = round(plain["vae"] / plain["ssvae"], 2)
    print(json.dumps(summary, indent=2))
    figures = {"metric": "images/s: plain loop / Lightning as train.py runs it (ratio) / Lightning bare (ratio)"
               + (" / variant (over Lightning)" if args.variant else "")}
    for model, result in results.items():
        speed = result["images_per_s"]
        cells = [f"{speed['plain']:.0f}", f"{speed['lightning']:.0f} ({result['ratio_lightning_to_plain']})",
                 f"{speed['lightning_bare']:.0f} ({result['ratio_lightning_bare_to_plain']})"]
        if args.variant:
            cells.append(f"{speed['lightning_variant']:.0f} ({result['ratio_variant_to_lightning']})")
        figures[model] = " / ".join(cells)
        extra = result["extra_ms_per_step"]
        figures[f"{model}_extra_ms"] = (f"{result['ms_per_step']['plain']} ms a plain step + guard {extra['guard']} "
                                        f"+ Lightning's loop {extra['lightning_loop']} + logger and bar {extra['logger_and_bar']}")
    if "ssvae_step_time_over_vae" in summary:
        figures["ssvae_step_time_over_vae"] = summary["ssvae_step_time_over_vae"]
    append("throughput.py", figures, overrides=[f"data.batch_size={args.batch_size}"], precision="the config's",
           seeds=[0], budget=f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} rounds",
           shared=args.shared, setting="speed_lightning", variant=" ".join(args.variant) or None)


if __name__ == "__main__":
    main()
