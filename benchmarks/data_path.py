"""Per-batch cost of the data path's two choices against their alternatives, on MNIST.

Gathering a batch of uint8 images by ``index_select`` (what ``TensorBatches`` does) versus
advanced indexing, and binarizing grey levels as ``rand < p`` (what ``MNISTDataModule`` does in
training) versus ``torch.bernoulli``. Prints JSON, microseconds per batch (median of rounds), and
appends it to the results registry (``registry.py``).

    python benchmarks/data_path.py --batch-size 128 --calls 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from registry import append, shared_option
from vaelab.data import MNISTDataModule


def microseconds(function, calls: int, repeats: int) -> float:
    """Median over ``repeats`` rounds of the mean time of ``calls`` calls."""
    function()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return round(statistics.median(rounds), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR", "data"))
    shared_option(parser)
    args = parser.parse_args()

    datamodule = MNISTDataModule(args.data_dir, download=False)
    datamodule.setup()
    images = datamodule.train_set.images
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.batch_size]
    grey = images[index].float().div_(255)
    timings = {
        "gather_index_select": lambda: images.index_select(0, index),
        "gather_advanced_indexing": lambda: images[index],
        "binarize_rand_less_than": lambda: (torch.rand_like(grey) < grey).to(grey.dtype),
        "binarize_torch_bernoulli": lambda: torch.bernoulli(grey),
    }
    results = {name: microseconds(function, args.calls, args.repeats) for name, function in timings.items()}
    print(json.dumps({"batch_size": args.batch_size, "threads": torch.get_num_threads(), "microseconds_per_batch": results}, indent=2))
    append("data_path.py", {"metric": f"microseconds per batch of {args.batch_size} MNIST images", **results},
           budget=f"{args.repeats} rounds of {args.calls} calls", shared=args.shared, setting="speed_data_path")


if __name__ == "__main__":
    main()
