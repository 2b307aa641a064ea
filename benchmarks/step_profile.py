"""Where a training step's time goes on this CPU, and what a change buys, side by side in one run.

Builds the model as ``python train.py`` does and times its training step (loss, backward, optimizer
step: the work Lightning wraps) in alternating rounds for the config and each variant: ``nchw``
(the convolutional classifier in the NCHW layout instead of channels-last) and any ``--variant``
of Hydra overrides. Prints JSON: ms per step and the speed-up of each variant, the step's FLOPs
(``torch.utils.flop_counter``; forward and backward) and rate against this CPU's float32 GEMM rate
(1024 x 1024 matrices) at the same threads, taken in each round, the share of the convolutional
classifier, one validation pass, the epoch it implies, and the ops that take the most time (``torch.profiler``).
Appends one record to the results registry (``registry.py``).

    python benchmarks/step_profile.py --model ssvae
    python benchmarks/step_profile.py --model sdgm --variant lit.optimizer.fused=null
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/step_profile.py --model ssvae trainer.precision=32-true   # as an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import hydra
import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from registry import append, shared_option
from vaelab.nets.conv import ConvFeatures
from vaelab.train import build
from vaelab.utils import CONFIG_DIR

warnings.filterwarnings("ignore", ".*does not have many workers.*")

MODELS = {"vae": ["model=vae"], "cvae": ["model=cvae"], "ssvae": ["model=ssvae", "data.labeled=100"],
          "adgm": ["model=adgm", "data.labeled=100"], "sdgm": ["model=sdgm", "data.labeled=100"]}


class Step:
    """One model's training step on real batches, as ``LitModel`` trains it without Lightning."""

    def __init__(self, overrides: list[str], nchw: bool = False) -> None:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            self.cfg = compose(config_name="train", overrides=overrides)
        torch.manual_seed(0)
        self.datamodule = hydra.utils.instantiate(self.cfg.data)
        self.datamodule.setup("fit")
        self.module = build(self.cfg, self.datamodule)
        if nchw:
            for features in (m for m in self.module.modules() if isinstance(m, ConvFeatures)):
                features.memory_format = torch.contiguous_format
                features.to(memory_format=torch.contiguous_format)
        self.module.configure_model()
        self.optimizer = self.module.configure_optimizers()
        self.module.train()
        self.bf16 = str(self.cfg.trainer.precision).startswith("bf16")  # Lightning's bf16-mixed: autocast
        self.batches = iter(())

    def batch(self):
        batch = next(self.batches, None)
        if batch is None:
            self.batches = iter(self.datamodule.train_dataloader())
            batch = next(self.batches)
        if isinstance(batch, tuple) and isinstance(batch[0], dict):  # CombinedLoader: (batch, index, loader)
            batch = batch[0]
        return self.datamodule.preprocess_batch(batch, train=True)

    def __call__(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.module.loss(self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def seconds(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self()
        return (time.perf_counter() - start) / steps

    @torch.no_grad()
    def validation_seconds(self) -> float:
        """One pass over the validation set, as ``LitModel.validation_step`` computes it."""
        self.module.eval()
        start = time.perf_counter()
        for images, labels in self.datamodule.val_dataloader():
            self.module.evaluation_terms(*self.datamodule.preprocess((images, labels), train=False))
        self.module.train()
        return time.perf_counter() - start


def gemm_rate() -> float:
    """float32 GFLOP/s of a 1024 x 1024 matrix product at torch's threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def flops(step: Step) -> tuple[float, float]:
    """GFLOP of one step, and the share of it in convolutions."""
    with FlopCounterMode(display=False) as counter:
        step()
    total = counter.get_total_flops()
    conv = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return total / 1e9, conv / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssvae", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--variant", nargs="+", default=[], help="overrides of a further variant, e.g. lit.optimizer.fused=null")
    parser.add_argument("--top", type=int, default=12, help="ops listed from the profile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR"))
    shared_option(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every run, e.g. trainer.precision=32-true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = [*MODELS[args.model], "trainer=cpu", "paths.output_dir=.", *([f"paths.data_dir={args.data_dir}"] if args.data_dir else []),
            *args.overrides]
    steps = {"config": Step(base)}
    if any(isinstance(m, ConvFeatures) for m in steps["config"].module.modules()):
        steps["nchw"] = Step(base, nchw=True)
    if args.variant:
        steps["variant"] = Step([*base, *args.variant])
    for step in steps.values():  # warm up: allocations, oneDNN's kernel choices
        step.seconds(5)
    # the GEMM rate is taken in every round beside the steps: on a shared or drifting machine a rate
    # measured once, before or after, is not the rate the steps ran at
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    gemm_rounds: list[float] = []
    for round_ in range(args.repeats):
        gemm_rounds.append(gemm_rate())
        for name in list(steps) if round_ % 2 == 0 else list(steps)[::-1]:
            rounds[name].append(steps[name].seconds(args.steps))
    ms = {name: statistics.median(values) * 1000 for name, values in rounds.items()}

    config = steps["config"]
    gflop, conv_share = flops(config)
    rate = statistics.median(gemm_rounds)
    validation = config.validation_seconds()
    per_epoch = len(config.datamodule.train_dataloader()) if config.datamodule.labeled is None else len(config.datamodule.unlabeled_set) // config.cfg.data.batch_size
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        config.seconds(10)
    ops = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    figures = {
        "metric": "ms per training step (median of alternating rounds)",
        "ms_per_step": {name: round(value, 1) for name, value in ms.items()},
        "ms_per_step_rounds": {name: [round(1000 * v, 1) for v in values] for name, values in rounds.items()},
        "speedup_over_config": {name: round(ms["config"] / value, 3) for name, value in ms.items() if name != "config"},
        "gflop_per_step": round(gflop, 2),
        "conv_share_of_flops": round(conv_share, 3),
        "gflops": round(gflop / ms["config"] * 1000, 1),
        "gemm_gflops": round(rate, 1),
        "gemm_gflops_rounds": [round(v, 1) for v in gemm_rounds],
        "share_of_gemm_rate": round(gflop / ms["config"] * 1000 / rate, 3),
        "share_of_gemm_rate_rounds": [round(gflop / step / rate_, 3) for step, rate_ in zip(rounds["config"], gemm_rounds)],
        "validation_s": round(validation, 1),
        "steps_per_epoch": per_epoch,
        "epoch_s": round(per_epoch * ms["config"] / 1000 + validation, 1),
        "top_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[: args.top]},
    }
    summary = {"model": args.model, "threads": torch.get_num_threads(), "precision": str(config.cfg.trainer.precision),
               "variant": args.variant, **figures}
    print(json.dumps(summary, indent=2))
    append("step_profile.py", figures, overrides=base, precision=str(config.cfg.trainer.precision), seeds=[0],
           budget=f"{args.repeats} rounds of {args.steps} steps", shared=args.shared, setting=f"speed_step_{args.model}",
           variant=" ".join(args.variant) or None)


if __name__ == "__main__":
    main()
