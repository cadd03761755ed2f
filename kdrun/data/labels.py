"""Label budgets and transfer sets: which training examples keep their labels.

``split.labeled`` keeps a class-stratified share of the training split labelled (chosen
with ``split.seed``); the rest, and any extra unlabelled data (``dataset.unlabeled``),
form the *transfer set*: examples only the teacher labels, for the distilled student
(Hinton et al. 2015, §3; Buciluǎ et al. 2006). A transfer-set example carries the
label UNLABELED, which ``F.cross_entropy`` ignores, so no loss can read a label that
is not there.
"""

from __future__ import annotations

import torch

from kdrun.errors import DataError

UNLABELED = -100  # F.cross_entropy's default ignore_index
# A position of a window that no loss, meter or metric reads (kdrun/train/tokens.py drops
# its row): an instruction's prompt, the padding after a response
NO_LOSS = -200


def labeled_count(budget: int | float | None, n: int, num_classes: int) -> int | None:
    """``split.labeled`` as a count of the ``n`` training examples: a count as given, a
    fraction of ``n``; None when every example keeps its label."""
    if budget is None:
        return None
    count = budget if isinstance(budget, int) else round(budget * n)
    if count > n:
        raise DataError(f"split.labeled={budget} is more than the {n} training examples "
                        f"(after split.max_train); give at most {n}, or a fraction below 1")
    if count < num_classes:
        raise DataError(f"split.labeled={budget} leaves {count} labelled examples, fewer than "
                        f"the {num_classes} classes; give at least {num_classes}")
    return None if count == n else count


def stratified_pick(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` examples, in ascending order, drawn with ``seed`` so that
    every class keeps its share of ``labels``: each class first gives one example (when
    ``count`` allows), then classes give in proportion to their size (largest
    remainders first), each class's examples taken in a random order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    classes, sizes = torch.unique(labels, return_counts=True)
    # rank of each example within its class, in the random order
    rank = torch.empty(len(labels), dtype=torch.float64)
    for c, size in zip(classes.tolist(), sizes.tolist()):
        members = order[labels[order] == c]
        rank[members] = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        rank[members[0]] = -1.0  # one of each class before any class gives a second
    # ties (equal shares of equal-sized classes) fall to the random order
    picked = order[torch.sort(rank[order], stable=True).indices[:count]]
    return torch.sort(picked).values


def split_labeled(labels: torch.Tensor, budget, seed: int,
                  num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(labelled indices, unlabelled indices) of the training examples under the budget
    ``split.labeled``, or None when every example keeps its label."""
    count = labeled_count(budget, len(labels), num_classes)
    if count is None:
        return None
    keep = stratified_pick(labels, count, seed)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[keep] = False
    return keep, rest.nonzero().squeeze(1)
