"""Label budgets and transfer sets (kdrun/data/labels.py): who sees which example and which
label, the hard-label term's scale on mixed batches, cache keys, the printed table."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdrun.data import base as data_module
from kdrun.data import load_data
from kdrun.data.labels import UNLABELED, stratified_pick
from kdrun.data.mnist1d import mnist1d
from kdrun.data.synthetic import synthetic
from kdrun.losses.base import hard_ce, kd_loss, soft_kl
from kdrun.losses.response import dkd_parts
from kdrun.run import pipeline
from kdrun.store.files import load_checkpoint
from kdrun.train import fit as train
from tests.helpers import TINY, make_config
from tests.test_sweep import FAST, kdrun

SMALL = TINY + ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
                "teacher.hidden=[32]", "student.hidden=[16]", "trainer.batch_size=32"]


def small_config(tmp_path, *overrides):
    return make_config(f"cache.dir={tmp_path}/cache", *SMALL, *overrides)


# ---------------------------------------------------------------- which examples keep labels


def test_labelled_subset_is_stratified_and_fixed_by_the_split_seed():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 150 + [3] * 50)
    pick = stratified_pick(labels, 200, seed=3)
    counts = torch.bincount(labels[pick], minlength=4).tolist()
    share = [500, 300, 150, 50]
    assert len(pick) == len(set(pick.tolist())) == 200
    assert all(abs(c - n * 200 / 1000) <= 1 for c, n in zip(counts, share)), counts
    assert torch.equal(pick, stratified_pick(labels, 200, seed=3))
    assert not torch.equal(pick, stratified_pick(labels, 200, seed=4))
    # every class keeps one example even when its share would round to none
    tiny = stratified_pick(torch.tensor([0] * 97 + [1, 2, 3]), 4, seed=0)
    assert sorted(torch.tensor([0] * 97 + [1, 2, 3])[tiny].tolist()) == [0, 1, 2, 3]


def test_validation_comes_from_the_labelled_part_and_the_rest_is_the_transfer_set():
    dataset = make_config("dataset=synthetic", "dataset.n=1000").dataset
    split = make_config("split.labeled=200", "split.val_fraction=0.25").split
    full = load_data(dataset, make_config("split.standardize=false").split)
    budget = load_data(dataset, make_config("split.labeled=200", "split.val_fraction=0.25",
                                            "split.standardize=false").split)
    assert (len(budget.train), len(budget.val), len(budget.transfer)) == (150, 50, 600)
    assert budget.unlabeled_count == 600
    assert (budget.transfer.y == UNLABELED).all()
    # labelled (train + val) and transfer partition the 800 training examples
    everything = torch.cat([full.train.x, full.val.x])
    parts = torch.cat([budget.train.x, budget.val.x, budget.transfer.x])
    assert len(parts) == len(everything)
    assert torch.equal(torch.sort(parts.sum(1)).values, torch.sort(everything.sum(1)).values)
    # the labelled part is the stratified pick of split.seed; val lies inside it
    picked = stratified_pick(synthetic(n=1000).y_train, 200, seed=split.seed)
    labelled_x = synthetic(n=1000).x_train[picked]
    rows = {tuple(r.tolist()) for r in labelled_x}
    assert all(tuple(r.tolist()) in rows for r in budget.val.x)
    assert all(tuple(r.tolist()) not in rows for r in budget.transfer.x)
    # hidden labels are kept apart, for the all-labels reference only
    assert budget.transfer_labels is not None and (budget.transfer_labels >= 0).all()


def test_generated_unlabelled_examples_do_not_overlap_the_test_set():
    raw = mnist1d(num_samples=500, unlabeled=300, cache_dir=None)
    extra, test, train_x = (t.flatten(1) for t in (raw.x_unlabeled, raw.x_test, raw.x_train))
    assert len(extra) == 300
    assert torch.cdist(extra, test).min() > 1e-3  # no sequence of the test set repeated
    assert torch.cdist(extra, train_x).min() > 1e-3
    made = synthetic(n=400, dim=8, unlabeled=200)
    assert torch.cdist(made.x_unlabeled, made.x_test).min() > 1e-3
    # the labelled data is the standard set with or without the extra examples
    plain = mnist1d(num_samples=500, cache_dir=None)
    assert torch.equal(plain.x_test, raw.x_test) and torch.equal(plain.y_train, raw.y_train)


# ---------------------------------------------------------------- no label leaks


def _garbage_unlabeled_labels(monkeypatch):
    """The synthetic builder, with the extra examples' labels replaced by garbage."""
    real = data_module.DATASETS.get("synthetic", "dataset.name")

    def garbage(**kwargs):
        raw = real(**kwargs)
        raw.y_unlabeled = torch.randint(0, kwargs.get("classes", 5), raw.y_unlabeled.shape,
                                        generator=torch.Generator().manual_seed(99))
        return raw

    monkeypatch.setitem(data_module.DATASETS._classes, "synthetic", garbage)
    data_module._LOADED.clear()


def _weights(run_dir, role):
    return load_checkpoint(run_dir / "checkpoints" / f"{role}.pt")["model"]


def test_garbage_labels_on_the_transfer_set_change_nothing_distilled(tmp_path, monkeypatch):
    overrides = ("dataset.unlabeled=200", "trainer.epochs=2", "loss=dkd")
    pipeline.run(small_config(tmp_path / "a", *overrides), tmp_path / "a" / "run")
    _garbage_unlabeled_labels(monkeypatch)
    pipeline.run(small_config(tmp_path / "b", *overrides), tmp_path / "b" / "run")
    data_module._LOADED.clear()
    for role in ("teacher", "scratch", "distilled"):
        a, b = _weights(tmp_path / "a" / "run", role), _weights(tmp_path / "b" / "run", role)
        assert all(torch.equal(a[k], b[k]) for k in a), role


def test_teacher_and_scratch_never_see_the_transfer_set(tmp_path, monkeypatch):
    seen = []
    real_fit = train.fit

    def spy(model, data, *args, stage, **kwargs):
        seen.append((stage, len(data.train), int((data.train.y == UNLABELED).sum())))
        return real_fit(model, data, *args, stage=stage, **kwargs)

    monkeypatch.setattr("kdrun.run.stage.fit", spy)
    cfg = small_config(tmp_path, "dataset.unlabeled=200", "split.labeled=100",
                       "all_labels_reference=true")
    rows = pd.DataFrame(pipeline.run(cfg, tmp_path / "run")["rows"])
    # 240 training examples: 100 labelled (90 train + 10 val), 140 + 200 unlabelled
    assert seen == [("teacher", 90, 0), ("scratch", 90, 0), ("distilled", 430, 340),
                    ("all_labels", 430, 0)]
    distilled = rows[rows.role == "distilled"].iloc[0]
    assert (distilled.train_labeled, distilled.train_unlabeled, distilled.val_examples) == \
        (90, 340, 10)
    # the extra examples change no stage that does not train on them: reused, same key
    data_module._LOADED.clear()
    other = pd.DataFrame(pipeline.run(small_config(tmp_path, "dataset.unlabeled=100",
                                                   "split.labeled=100"),
                                      tmp_path / "other")["rows"])
    key = lambda df, role: df[df.role == role].cache_key.iloc[0]  # noqa: E731
    assert key(other, "teacher") == key(rows, "teacher")
    assert key(other, "scratch") == key(rows, "scratch")
    assert key(other, "distilled") != key(rows, "distilled")
    assert other.set_index("role").reused[["teacher", "scratch"]].all()


# ---------------------------------------------------------------- losses on mixed batches


def test_hard_label_term_is_the_mean_over_the_labelled_examples_of_a_batch():
    torch.manual_seed(0)
    z, t = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([1, UNLABELED, 3, UNLABELED, 0, 2])
    known = y != UNLABELED
    assert torch.allclose(hard_ce(z, y), F.cross_entropy(z[known], y[known]))
    by_hand = 0.9 * 16 * soft_kl(z, t, 4.0) + 0.1 * F.cross_entropy(z[known], y[known])
    assert torch.allclose(kd_loss(z, t, y, T=4.0, alpha=0.9), by_hand)  # masked by default
    # a batch with no label: the term is 0 and gives no gradient, never NaN (plain CE: NaN)
    assert torch.isnan(F.cross_entropy(z, torch.full((6,), UNLABELED)))
    z.requires_grad_(True)
    none = hard_ce(z, torch.full((6,), UNLABELED))
    none.backward()
    assert none.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))
    # fully labelled: exactly F.cross_entropy, bit for bit
    full = torch.tensor([1, 0, 3, 2, 0, 2])
    assert torch.equal(hard_ce(z, full), F.cross_entropy(z, full))


def test_dkd_splits_an_unlabelled_example_on_the_teachers_top_class():
    from kdrun.losses import DKD

    torch.manual_seed(1)
    z, t = torch.randn(5, 6), torch.randn(5, 6)
    labels = torch.tensor([2, UNLABELED, 0, UNLABELED, UNLABELED])
    on_transfer = DKD()
    on_transfer.all_labelled = False  # as fit() sets it on a transfer set
    as_teacher = torch.where(labels == UNLABELED, t.argmax(1), labels)
    expected = dkd_parts(z, t, as_teacher, 4.0)
    tckd, nckd, _ = expected
    by_hand = (F.cross_entropy(z[[0, 2]], labels[[0, 2]])
               + 16 * (tckd.mean() + 8 * nckd.mean()))
    assert torch.allclose(on_transfer(z, t, labels), by_hand)


def test_fit_masks_the_hard_label_term_only_on_a_transfer_set(tmp_path, monkeypatch):
    seen = []
    real = train.fit

    def spy(model, data, loss_fn, *args, **kwargs):
        result = real(model, data, loss_fn, *args, **kwargs)
        seen.append((kwargs["stage"], loss_fn.all_labelled))
        return result

    monkeypatch.setattr("kdrun.run.stage.fit", spy)
    pipeline.run(small_config(tmp_path, "dataset.unlabeled=50"), tmp_path / "run")
    assert seen == [("teacher", True), ("scratch", True), ("distilled", False)]


def test_training_accuracy_counts_labelled_examples_only():
    meter = train.EpochMeter(1, "cpu", count_labels=True)
    logits = torch.eye(4)  # predicts 0, 1, 2, 3
    meter.add(1, torch.tensor(1.0), logits, torch.tensor([0, 1, UNLABELED, 0]))
    assert meter.result()[1] == pytest.approx(100 * 2 / 3)


# ---------------------------------------------------------------- the table


def test_table_names_the_data_and_the_all_labels_reference(tmp_path):
    cfg = small_config(tmp_path, "split.labeled=0.5", "all_labels_reference=true")
    table = pipeline.run(cfg, tmp_path / "run")["table"]
    assert "data: labelled 108 (+ 12 validation) · unlabelled 120" in table
    assert "reference  mlp[16], all labels" in table
    assert "not a contender" in table and "of the scratch-to-reference gap" in table
    # the same-data comparison: no transfer set, no data line
    plain = pipeline.run(small_config(tmp_path), tmp_path / "plain")["table"]
    assert "unlabelled" not in plain


def test_image_folder_unlabeled_folder_and_budget(tmp_path):
    from PIL import Image

    for split, count in (("train/cat", 6), ("train/dog", 6), ("extra/any", 5)):
        folder = tmp_path / split
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    dataset = make_config("dataset=imagefolder", f"dataset.root={tmp_path}",
                          "dataset.unlabeled=extra", "dataset.test_fraction=0.25").dataset
    loaded = load_data(dataset, make_config("split.labeled=4", "split.val_fraction=0.25").split)
    # 12 files: 3 test, 9 left; 4 of them labelled (1 val, 3 train); 5 + 5 unlabelled
    assert (len(loaded.test), len(loaded.val), len(loaded.train)) == (3, 1, 3)
    assert len(loaded.transfer) == 10 and set(loaded.transfer.labels) == {UNLABELED}
    assert sum(f.parent.name == "any" for f in loaded.transfer.files) == 5
    joined = loaded.distill_train()
    assert len(joined) == 13 and (joined.y == UNLABELED).sum() == 10


@pytest.mark.slow  # a sweep of its own, ~6 s (make test < 5 min)
def test_a_sweep_over_the_label_budget_reports_one_setting_per_budget(tmp_path):
    kdrun(tmp_path, "-m", "split.labeled=100,0.5", "dataset.unlabeled=200", *FAST)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    report = (sweep / "report.md").read_text()
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:] if line.split("|")[1].strip() in ("100", "0.5")]
    assert len(rows) == 2, report
    # 400 training examples: 100 or 200 labelled, the rest and the 200 extra unlabelled
    assert [(r["split.labeled"], r["labelled"], r["unlabelled"]) for r in rows] == [
        ("0.5", "200", "400"), ("100", "100", "500")]
    assert (sweep / "gain_vs_split.labeled.png").stat().st_size > 0


def test_a_torchvision_set_takes_a_label_budget(tmp_path):
    from tests.helpers import write_mnist

    arrays = write_mnist(tmp_path, n_train=120, n_test=40)
    dataset = make_config("dataset=mnist", f"dataset.root={tmp_path}").dataset
    data = load_data(dataset, make_config("split.labeled=30", "split.val_fraction=0.2").split)
    assert (len(data.train), len(data.val), len(data.transfer)) == (24, 6, 90)
    # the hidden labels are MNIST's own, in the order the transfer set holds the images
    labels = torch.as_tensor(arrays["train-labels-idx1-ubyte"])
    assert sorted(data.transfer_labels.tolist() + data.train.y.tolist()
                  + data.val.y.tolist()) == sorted(labels.tolist())
