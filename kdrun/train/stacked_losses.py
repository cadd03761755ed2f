"""The losses of a stacked group's members (kdrun/train/stacked.py), each on its slice of
the stacked logits, as few vmap calls as their classes allow."""

from __future__ import annotations

import copy
import logging

import torch
from torch.func import vmap

from kdrun.losses.base import DistillationLoss

log = logging.getLogger("kdrun")


class StackedLosses:
    """Every member's loss on its slice of the stacked logits, as a (members,) tensor.
    Members whose losses are of one class and differ only in their float settings (T,
    alpha, a warm-up ramp, ...) are computed in one vmap call, with those settings as
    tensors; a loss that vmap cannot run (e.g. boolean-mask indexing) is called member
    by member."""

    def __init__(self, losses: list[DistillationLoss], device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype  # the settings' dtype: the logits'
        groups: dict[tuple, list[int]] = {}
        for i, loss in enumerate(losses):
            fixed = tuple(sorted((k, repr(v)) for k, v in vars(loss).items()
                                 if not k.startswith("_") and not _is_float(v)))
            groups.setdefault((type(loss), fixed), []).append(i)
        self.losses, self.groups = losses, list(groups.values())
        # each group's member indices, made once; None for one group of every member in
        # order, which needs no gather from the stacked logits
        everyone = len(self.groups) == 1
        self.index = [None if everyone else torch.tensor(g, device=device) for g in self.groups]
        self.vmapped = [True] * len(self.groups)
        self.settings: list[dict[str, torch.Tensor]] = []

    def start_epoch(self, epoch: int) -> None:
        """Each member's start_epoch (e.g. DKD's warm-up), then its float settings."""
        for loss in self.losses:
            loss.start_epoch(epoch)
        self.settings = [
            {k: torch.tensor([vars(self.losses[i])[k] for i in members], device=self.device,
                             dtype=self.dtype)
             for k, v in vars(self.losses[members[0]]).items()
             if not k.startswith("_") and _is_float(v)}
            for members in self.groups]

    def __call__(self, logits, teacher, labels) -> torch.Tensor:
        if self.index[0] is None:
            return self._group(0, logits, teacher, labels)
        out = logits.new_empty(len(self.losses))
        for g, idx in enumerate(self.index):
            values = self._group(g, logits[idx], None if teacher is None else teacher[idx],
                                 labels[idx])
            out = out.index_put((idx,), values)
        return out

    def _group(self, g: int, logits, teacher, labels) -> torch.Tensor:
        if self.vmapped[g]:
            try:
                return self._vmapped(g, logits, teacher, labels)
            except RuntimeError as e:  # no batching rule, or data-dependent control flow
                log.debug("batched losses: %s member by member (%s)",
                          type(self.losses[self.groups[g][0]]).__name__, e)
                self.vmapped[g] = False
        return torch.stack([self.losses[i](logits[j], None if teacher is None else teacher[j],
                                           labels[j]) for j, i in enumerate(self.groups[g])])

    def _vmapped(self, g: int, logits, teacher, labels) -> torch.Tensor:
        template = self.losses[self.groups[g][0]]

        def one(settings, s, t, y):
            loss = copy.copy(template)  # shallow: the same class and fixed settings
            vars(loss).update(settings)
            return loss(s, t, y)

        return vmap(one, in_dims=(0, 0, None if teacher is None else 0, 0))(
            self.settings[g], logits, teacher, labels)


def _is_float(value) -> bool:
    return isinstance(value, float)
