"""A run's hold on its directory and files: one run per directory, files that are whole or
absent, and an exit status that says when a signal stopped the run."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from hydra.experimental.callback import Callback
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

CLAIM = ".vaelab-run"  # in every run directory: who holds it (an exclusive lock while running)
RESULTS = ("checkpoints", "csv", "tensorboard", "wandb", "images", "metrics.json", "figures")  # what a run leaves
TEMPORARY = ".tmp-"  # in the names of files being written (see atomic_write)

_held: dict[Path, IO] = {}  # run directories this process holds, and their locked claim files


class RunDirectoryInUse(RuntimeError):
    """The run directory belongs to another run."""


def holds_results(path: Path) -> list[str]:
    """What an earlier run left in ``path`` (checkpoints, logs, metrics, figures)."""
    return [name for name in RESULTS if (path / name).is_file() or any((path / name).glob("*"))]


def set_launch_rank(devices_per_node: Any) -> int:
    """Tell Lightning's rank-zero guard this process's global rank before the trainer exists.
    Lightning reads it from ``RANK``, ``LOCAL_RANK`` or ``SLURM_PROCID`` alone; a node started
    by hand with Lightning's own variables (``NODE_RANK``, ``MASTER_ADDR``...) would otherwise
    take itself for rank 0 and claim the run directory. Rank = node * devices per node + local."""
    if not any(name in os.environ for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")):
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
        devices = devices_per_node if isinstance(devices_per_node, int) and devices_per_node > 0 else 1
        rank_zero_only.rank = node * devices + int(os.environ.get("LOCAL_RANK", 0))
    return rank_zero_only.rank


@contextmanager
def run_directory(path: str | Path, resume_from: str | None = None) -> Iterator[None]:
    """Hold ``path`` for this run: refuse it while another process holds it, or when it holds
    an earlier run's results, unless this run resumes from a checkpoint inside it. The lock is
    held (an exclusive ``flock`` on ``.vaelab-run``) until the block ends or the process exits,
    so of two processes racing for one directory only one proceeds. Re-entrant within a process;
    only the process of rank 0 takes it (the others of a distributed run share its directory).
    Files that a killed writer left half-written are removed."""
    path = Path(path).resolve()
    if path in _held or rank_zero_only.rank != 0:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    claim = open(path / CLAIM, "a+")
    try:
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        claim.seek(0)
        holder = claim.read().strip() or "another process"
        claim.close()
        raise RunDirectoryInUse(
            f"Run directory {path} is in use by {holder}. Give this run its own directory "
            "(leave hydra.run.dir at its default, or choose another) or wait for that run to end."
        ) from None
    resuming = resume_from is not None and Path(resume_from).resolve().is_relative_to(path)
    found = holds_results(path)
    if found and not resuming:
        claim.close()
        last = path / "checkpoints" / "last.ckpt"
        raise RunDirectoryInUse(
            f"Run directory {path} holds another run's results ({', '.join(found)}). Give this run its "
            "own directory (leave hydra.run.dir at its default, or choose another)"
            + (f", or continue that run with ckpt_path={last}." if last.is_file() else ".")
        )
    remove_partial_files(path)
    if resuming:
        keep_logs(path)
    claim.seek(0)
    claim.truncate()
    claim.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    claim.flush()
    _held[path] = claim
    try:
        yield
    finally:
        _held.pop(path).close()  # closing releases the lock


def keep_logs(path: Path) -> None:
    """Lightning's CSV logger deletes the ``metrics.csv`` it finds: before a run resumes in its
    own directory, rename each to ``metrics.until-<time>.csv``."""
    for log_file in path.glob("**/metrics.csv"):
        kept = log_file.with_name(f"metrics.until-{time.strftime('%Y-%m-%d_%H-%M-%S')}.csv")
        log_file.rename(kept)
        log.info("Resuming in %s: the earlier metrics are in %s.", path, kept)


def remove_partial_files(path: Path) -> None:
    """Delete the temporary files of writes that never finished (a killed process) in ``path``
    and its ``checkpoints``."""
    for directory in (path, path / "checkpoints"):
        for orphan in directory.glob(f".*{TEMPORARY}*"):
            log.warning("Removing %s, a file whose writing never finished.", orphan)
            orphan.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends, flush it to disk
    and rename it over ``path``. Readers see the old file or the new one, never a part: an
    interruption leaves the old file (and at worst a temporary one that the next run in that
    directory removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}")
    try:
        with open(temporary, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if not disk_full(error, path.parent):
            raise
        raise OSError(
            errno.ENOSPC,
            f"No space left on device (ENOSPC) while writing {path}; {'the earlier file there is intact' if path.exists() else 'nothing was written there'}. "
            f"Free space on that disk (or write elsewhere: paths.output_dir=...), then run again (a training run resumes with "
            f"ckpt_path=<its newest checkpoint>).",
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether ``error`` (or an error it came from) is a full disk: ENOSPC, its message (torch's
    writer reports it as "unexpected pos" with the cause inside), or under 1 MiB left in ``directory``."""
    chain, link = [], error
    while link is not None and link not in chain:  # a chain can loop back on itself
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) for e in chain):
        return True
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by ``atomic_write`` in their own directory (Lightning's default
    stages them in ``$TMPDIR``; from another filesystem the final move is a copy that a kill
    can cut short). Remote paths keep Lightning's way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "file" not in get_filesystem(path).protocol:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path, "wb") as file:
            torch.save(checkpoint, file)


class ClaimRunDirectory(Callback):
    """Hydra callback: take the run directory (``run_directory``) before Hydra writes its
    ``.hydra/`` files into it, so a refused run changes nothing there. (Hydra turns a
    callback's exceptions into warnings; a refusal here ends the process with its message.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if set_launch_rank(config.get("trainer", {}).get("devices")) != 0:  # another process of a distributed run
            return
        try:
            path = Path(config.hydra.run.dir)
        except Exception:  # interpolations that only resolve inside the job: the job claims it
            return
        self._hold = run_directory(path, config.get("ckpt_path") or restart_checkpoint(path))
        try:
            self._hold.__enter__()
        except RunDirectoryInUse as refused:
            self._hold = None
            raise SystemExit(f"Error: {refused}") from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "_hold", None) is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None


def restart_checkpoint(path: Path) -> str | None:
    """For a cluster job that SLURM restarted (requeued after preemption or its time limit:
    ``SLURM_RESTART_COUNT`` > 0), the ``last.ckpt`` in its run directory ``path``."""
    last = Path(path) / "checkpoints" / "last.ckpt"
    if int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0 and last.is_file():
        return str(last)
    return None


@contextmanager
def signal_exit_status(ckpt_dir: str | Path | None = None) -> Iterator[None]:
    """Lightning ends a run stopped by SIGTERM with exit status 0 and one stopped by Ctrl-C with
    1, after writing its checkpoint: exit with 143 (128 + SIGTERM) or 130 (128 + SIGINT) instead,
    so ``train && evaluate`` and job schedulers see that the run did not finish."""
    try:
        yield
    except (SIGTERMException, KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and not isinstance(stop, SIGTERMException) and stop.code != 1:
            raise
        signum = signal.SIGTERM if isinstance(stop, SIGTERMException) else signal.SIGINT
        last = Path(ckpt_dir) / "last.ckpt" if ckpt_dir else None
        resume = f"; resume with ckpt_path={last}" if last and last.is_file() else ""
        log.error("Stopped by %s%s.", signal.Signals(signum).name, resume)
        raise SystemExit(128 + signum) from None
