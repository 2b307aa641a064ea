"""The importance-weighted bound of whole batches in passes of bounded memory: the test metric
``nll_iwae`` with thousands of samples, and the validation bound of ``objective=iwae``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaelab.elbo import iwae_bound
from vaelab.models.base import LatentModel


class Interrupted(Exception):
    """Raised between passes when ``should_stop`` says so (a pass can take minutes)."""


def passes(batch_size: int, k: int, rows_per_sample: int, rows: int) -> list[int]:
    """Importance samples per pass for a batch: at most ``rows`` decoder rows each (an image
    and a sample decode ``rows_per_sample`` rows: the number of classes for models that sum y out)."""
    per_pass = max(1, rows // (batch_size * rows_per_sample))
    return [min(per_pass, k - start) for start in range(0, k, per_pass)]


@torch.no_grad()
def importance_weighted(
    model: LatentModel, x: torch.Tensor, y: torch.Tensor | None, k: int, rows: int = 20_000,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """L_k per example (``vaelab.elbo.iwae_bound``) from k samples drawn in passes of at most
    ``rows`` decoder rows; ``should_stop`` is asked before each pass."""
    weights = []
    for n in passes(len(x), k, model.rows_per_sample, rows):
        if should_stop is not None and should_stop():
            raise Interrupted
        weights.append(model.log_weights(x, y, n))
    return iwae_bound(torch.cat(weights))
