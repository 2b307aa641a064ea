"""M2 beside Pyro's ``examples/vae/ss_vae_M2.py`` (Pyro 1.9.1), side by side on one core each for
the same minutes: seconds per epoch (each with its own validation) and validation accuracy against
minutes. Pyro runs its example's documented settings (``EXAMPLE_RUN`` there) with 100 labels and the
largest batch up to its 200 that the example accepts (it needs the batch to divide the labeled,
validation and training counts: 100 for 100 labels). vaelab runs ``benchmarks/m2_mnist.py``
(model=ssvae, and any Hydra overrides given), which appends its own record; its curves go to
``outputs/benchmarks/pyro_m2``. Prints JSON and appends a record of Pyro's run, with the ratio of
the two epoch times, to the results registry. If either run fails, the script stops both at once with
its output.

    pip install pyro-ppl==1.9.1 visdom       # the example imports visdom
    git clone --depth 1 --branch 1.9.1 https://github.com/pyro-ppl/pyro /tmp/pyro   # it is not in the wheel
    python benchmarks/pyro_m2.py --example /tmp/pyro/examples/vae/ss_vae_M2.py --minutes 10
    python benchmarks/pyro_m2.py --example /tmp/pyro/examples/vae/ss_vae_M2.py --minutes 10 model.classifier_net=null  # its layer sizes

The example reads MNIST from ``<example>/utils/.data/MNISTCached/raw``; the script links ``--data-dir``'s
files there when that directory is missing or empty, so both read the same files offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from registry import append

ROOT = Path(__file__).resolve().parents[1]
# the example's own documented run (EXAMPLE_RUN in ss_vae_M2.py), on the CPU, 100 labels
PYRO_SETTINGS = ["--seed", "0", "--aux-loss", "-alm", "46", "-enum", "parallel", "-zd", "50", "-hl", "500",
                 "-lr", "0.00042", "-b1", "0.95", "-n", "100000"]
PYRO_BATCH, PYRO_VALIDATION = 200, 10_000
EPOCH_LINE = re.compile(r"^(\d+) epoch: .*validation accuracy ([0-9.]+)")


def pyro_batch_size(labeled: int) -> int:
    """The largest batch up to the example's 200 that divides the labeled and validation counts
    (and so the 50,000 training images), as the example asserts."""
    return max(b for b in range(1, PYRO_BATCH + 1) if labeled % b == 0 and PYRO_VALIDATION % b == 0)


def pyro_epochs(lines: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """(seconds since the start, validation accuracy) at the end of each epoch Pyro printed."""
    return [(seconds, float(match.group(2))) for seconds, line in lines if (match := EPOCH_LINE.match(line))]


def timed_lines(process: subprocess.Popen, start: float, into: list[tuple[float, str]]) -> None:
    for line in process.stdout:
        into.append((time.perf_counter() - start, line.strip()))


def last_lines(lines: list[tuple[float, str]], n: int = 20) -> str:
    return "\n".join(line for _, line in lines[-n:])


def link_mnist(example: Path, data_dir: str) -> None:
    """Point the example's MNIST folder (torchvision's, for its class MNISTCached) at ``data_dir``'s
    files when it is missing or empty, so that both runs read the same files offline."""
    linked = example.parent / "utils" / ".data" / "MNISTCached" / "raw"
    if not linked.exists() or (linked.is_dir() and not any(linked.iterdir())):
        linked.parent.mkdir(parents=True, exist_ok=True)
        if linked.is_dir():
            linked.rmdir()
        linked.symlink_to(Path(data_dir).resolve() / "MNIST" / "raw")


def run_side_by_side(args: argparse.Namespace, pyro_args: list[str]) -> tuple[list[tuple[float, str]], str]:
    """Start Pyro's example and ``m2_mnist.py`` together and let both run for ``args.minutes``;
    returns Pyro's timed output lines and vaelab's stdout. Exits at once, with the failing run's
    output, if either fails, stopping the other."""
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    pyro = subprocess.Popen([sys.executable, args.example.name, *pyro_args], cwd=args.example.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=timed_lines, args=(pyro, start, lines), daemon=True)
    reader.start()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ours = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "m2_mnist.py"), "--labeled", str(args.labeled),
                                 "--max-minutes", f"{args.minutes:g}", "--threads", str(args.threads), "--data-dir", args.data_dir,
                                 "--out-dir", str(ROOT / "outputs" / "benchmarks" / "pyro_m2"), "--shared", *args.overrides],
                                env=env, stdout=out, stderr=err, text=True)
        while ours.poll() is None and pyro.poll() in (None, 0):
            time.sleep(1)
        pyro_failed = pyro.returncode
        if pyro_failed or ours.returncode:  # one failed: stop the other rather than spend the minutes
            for process in (pyro, ours):
                process.terminate()
                process.wait()
            reader.join(timeout=10)
            err.seek(0)
            sys.exit(f"Pyro's example failed (exit code {pyro_failed}); its last output:\n{last_lines(lines)}" if pyro_failed
                     else f"vaelab's run failed:\n{err.read()[-3000:]}")
        remaining = args.minutes * 60 - (time.perf_counter() - start)
        if remaining > 0 and pyro.poll() is None:
            time.sleep(remaining)
        pyro.terminate()
        pyro.wait()
        reader.join(timeout=10)
        out.seek(0)
        return lines, out.read()


def comparison(epochs: list[tuple[float, float]], record: dict) -> dict:
    """The record's figures: both runs' seconds per epoch, their ratio, and Pyro's accuracy curve
    beside vaelab's minutes to each accuracy (``record``: m2_mnist.py's)."""
    pyro_epoch = epochs[-1][0] / len(epochs)
    return {
        "metric": "seconds per epoch, validation included, one core each: Pyro's example, vaelab (Pyro's over vaelab's)",
        "pyro_seconds_per_epoch": round(pyro_epoch, 1),
        "vaelab_seconds_per_epoch": record["figures"]["seconds_per_epoch"],
        "epoch_speed_vs_pyro": round(pyro_epoch / record["figures"]["seconds_per_epoch"], 2),
        "pyro_minutes": [round(seconds / 60, 1) for seconds, _ in epochs],
        "pyro_val_acc": [round(100 * acc, 1) for _, acc in epochs],
        "vaelab_record": record["id"],
        "vaelab_minutes_to_val_acc": record["figures"]["minutes_to_val_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, required=True, help="Pyro 1.9.1's examples/vae/ss_vae_M2.py")
    parser.add_argument("--minutes", type=float, default=10.0, help="each run's budget")
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA_DIR", str(ROOT / "data")), help="holds MNIST/raw")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of vaelab's run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as each run's: the record names the threads from torch
    if not args.example.is_file():
        sys.exit(f"{args.example} is not a file: pass Pyro 1.9.1's examples/vae/ss_vae_M2.py (see --help).")
    link_mnist(args.example, args.data_dir)
    pyro_args = [*PYRO_SETTINGS, "-bs", str(pyro_batch_size(args.labeled)), "-sup", str(args.labeled)]
    lines, stdout = run_side_by_side(args, pyro_args)
    epochs = pyro_epochs(lines)
    if not epochs:
        sys.exit(f"Pyro's example finished no epoch in {args.minutes:g} minutes; its last output:\n{last_lines(lines)}")
    # m2_mnist.py prints its record last, the top-level brace on a line of its own (progress output may hold braces)
    record = json.loads(stdout[stdout.rfind("\n{\n") + 1:])
    print(json.dumps(append("pyro_m2.py", comparison(epochs, record), precision="32-true",
                            budget=f"{args.minutes:g} minutes each, side by side", shared=True, setting="speed_pyro",
                            split_seeds=[0], overrides=args.overrides, variant=" ".join(args.overrides) or None,
                            notes=f"Pyro: python ss_vae_M2.py {' '.join(pyro_args)} (its own split of the labels)"),
                     indent=2))


if __name__ == "__main__":
    main()
