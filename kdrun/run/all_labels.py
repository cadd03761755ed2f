"""The "scratch, all labels" reference (``all_labels_reference=true``), an add-on to a run
with a transfer set whose labels exist (kdrun/run/add_ons.py): the student trained from
scratch on the labelled examples *and* the transfer set with its true labels, which no
other student stage reads.
The same training data serves a teacher that learns every label (scheme=data_free under
a label budget: the data owner's teacher)."""

from __future__ import annotations

import hashlib

from kdrun.data import Data
from kdrun.losses import CE
from kdrun.run.stage import StageSpec


def all_labels_data(data: Data, transfer_digest: str | None) -> tuple[Data, dict] | None:
    """The labelled examples and the transfer set with its true labels, as a stage's
    training data, with what its key adds; None when those labels are unknown."""
    train = data.all_labels_train()
    if train is None:
        return None
    labels = hashlib.sha256(data.transfer_labels.numpy().tobytes()).hexdigest()[:20]
    return data.training_on(train), {"transfer": transfer_digest, "transfer_labels": labels}


def reference_spec(data: Data, transfer_digest: str | None, model_cfg, seed: int,
                   epochs: int) -> StageSpec | None:
    """The reference student's stage of ``seed``; None when the labels are unknown."""
    found = all_labels_data(data, transfer_digest)
    if found is None:
        return None
    train, key = found
    return StageSpec("all_labels", model_cfg, CE, seed, seed, epochs, train, key)


def wanted(cfg) -> bool:
    """Whether the run adds the reference row (checked beforehand: the labels exist)."""
    return bool(cfg.get("all_labels_reference"))


def rows(stages, cfg, taught) -> list:
    """A seed's reference row."""
    return [stages.all_labels_student(taught.seed).row]
