"""The balanced labeled/unlabeled split of a training set."""

from __future__ import annotations

import torch


def parse_labeled(labeled: int | str | None, num_classes: int) -> int | None:
    """Validate ``data.labeled``: ``None`` or ``"all"`` (every label available) or a positive
    multiple of the number of classes."""
    if labeled is None or labeled == "all":
        return None
    if isinstance(labeled, bool) or not isinstance(labeled, int):
        raise ValueError(
            f"data.labeled={labeled!r} must be a number of labeled examples (a positive multiple "
            f"of {num_classes}) or null/all for fully labeled training."
        )
    if labeled <= 0 or labeled % num_classes:
        raise ValueError(
            f"data.labeled={labeled} must be a positive multiple of the {num_classes} classes "
            f"(the split is balanced: labeled/{num_classes} per class), e.g. {10 * num_classes}."
        )
    return labeled


def balanced_split(labels: torch.Tensor, labeled: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``labeled`` examples, ``labeled / num_classes`` of each class, drawn with
    ``seed`` alone (so every process draws the same ones), and the indices of the others."""
    per_class = labeled // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(num_classes):
        members = (labels == k).nonzero().squeeze(1)
        if len(members) < per_class:
            raise ValueError(
                f"data.labeled={labeled} needs {per_class} examples of class {k}, but the training "
                f"split holds only {len(members)}; choose at most "
                f"{num_classes * int(torch.bincount(labels, minlength=num_classes).min())}."
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    labeled_idx = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[labeled_idx] = False
    return labeled_idx, mask.nonzero().squeeze(1)
