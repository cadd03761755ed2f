"""trainer.loss_chunk_rows: the row-wise losses computed a chunk of rows at a time give
the same value and gradients (float64, a bound of 1e-12: the same terms summed in
another order, each ~1) and keep far less for the backward pass."""

from __future__ import annotations

import functools

import pytest
import torch

from kdrun.data.labels import UNLABELED
from kdrun.losses import LOSSES, build_loss
from tests.helpers import make_config

CHUNKED = ["kd", "kd_ls", "ce", "reverse_kl", "jsd", "skew_kl", "tv", "uld"]


@functools.cache
def loss_config(name: str):
    return make_config(f"loss={name}").loss


def loss_and_grad(name: str, chunk_rows, labels, all_labelled: bool):
    torch.manual_seed(0)
    student = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(10, 7, dtype=torch.float64) * 2
    loss = build_loss(loss_config(name))
    loss.all_labelled, loss.chunk_rows = all_labelled, chunk_rows
    value = loss(student, teacher, labels)
    value.backward()
    return value.detach(), student.grad


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("labelled", ["all", "some", "none"])
def test_a_chunked_loss_equals_the_whole_batchs_value_and_gradient(name, labelled):
    labels = torch.arange(10) % 7
    if labelled != "all":  # a transfer set's rows, or a student's own text (on-policy)
        labels[3:] = UNLABELED if labelled == "some" else labels[3:]
        labels[:] = UNLABELED if labelled == "none" else labels
    whole = loss_and_grad(name, None, labels, labelled == "all")
    chunked = loss_and_grad(name, 3, labels, labelled == "all")  # chunks of 3, 3, 3 and 1
    assert float((whole[0] - chunked[0]).abs()) < 1e-12
    assert float((whole[1] - chunked[1]).abs().max()) < 1e-12
    assert (whole[0] != 0) or name == "ce"  # a real value (ce without labels is 0)


def test_every_loss_that_says_it_chunks_is_checked_here():
    assert sorted(n for n in LOSSES.names() if LOSSES.get(n, "loss").chunks_rows) == \
        sorted(CHUNKED)


def test_chunks_keep_one_chunks_softmaxes_for_the_backward_pass():
    """The memory autograd keeps for the backward pass (distinct storages): the whole
    batch keeps several tensors of rows x vocabulary (the softmaxes of both terms);
    chunks of 64 rows keep only views of the logits they were given."""
    rows, vocab = 1024, 500

    def saved_elements(chunk_rows) -> int:
        student = torch.randn(rows, vocab, requires_grad=True)
        teacher, labels = torch.randn(rows, vocab), torch.randint(vocab, (rows,))
        loss = build_loss(loss_config("jsd"))
        loss.chunk_rows = chunk_rows
        storages = {}

        def keep(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss(student, teacher, labels)
        return sum(storages.values())

    whole, chunked = saved_elements(None), saved_elements(64)
    assert whole >= 4 * rows * vocab, whole
    assert chunked <= 2 * rows * vocab + 64 * vocab, chunked  # student's and teacher's logits


def test_a_sweep_trains_students_with_a_chunked_loss_one_at_a_time():
    from kdrun.models import build_model
    from kdrun.train.stacked import NotBatchable, check_batchable

    cfg = make_config("trainer.loss_chunk_rows=64")
    model = build_model(cfg.student, (1, 40), 10)
    with pytest.raises(NotBatchable, match="trainer.loss_chunk_rows"):
        check_batchable(model, build_loss(cfg.loss), cfg.trainer, torch.device("cpu"))
    check_batchable(model, build_loss(cfg.loss), make_config().trainer, torch.device("cpu"))
