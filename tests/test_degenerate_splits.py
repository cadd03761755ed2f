"""Degenerate data splits, through the command line: each either finishes with a result
labelled for what it is, or exits 2 with one line. Never a traceback."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from kdrun import cli

QUICK = ["progress=false", "repeats=2", "trainer.epochs=2", "num_threads=1"]
SYNTHETIC = ["dataset=synthetic", "dataset.n=200", "dataset.dim=10", "teacher=mlp",
             "teacher.hidden=[16]", "student.hidden=[8]"]
LAST_EPOCH = "last epoch (no validation split)"

# (case, overrides, expected): expected is the `selected_by` of a finished run, or the
# words of the one-line error
CASES = [
    ("no validation examples", ["split.val_fraction=0"], LAST_EPOCH),
    ("validation split rounds to nothing", ["split.max_train=4", "split.val_fraction=0.1"],
     LAST_EPOCH),
    ("fewer examples than classes", ["dataset.classes=5", "split.max_train=3",
                                     "split.max_test=2"], LAST_EPOCH),
    ("one training example", ["split.max_train=1", "split.val_fraction=0"], LAST_EPOCH),
    ("a class missing from the test split", ["split.max_test=2"], "val"),
    ("batch larger than the data", ["trainer.batch_size=100000",
                                    "trainer.eval_batch_size=100000"], "val"),
    ("no training examples", ["split.max_train=2", "split.val_fraction=0.9"],
     ["the train split is empty", "split.max_train"]),
    ("no test examples", ["dataset.test_fraction=0.001"],
     ["the test split is empty", "dataset.test_fraction"]),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_degenerate_split_finishes_labelled_or_exits_2_in_one_line(tmp_path, monkeypatch, capfd,
                                                                   overrides, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kdrun", *QUICK, *SYNTHETIC, *overrides,
                                      "hydra.run.dir=run"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    if isinstance(expected, list):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("kdrun: error: "), err
        assert all(w in lines[0] for w in expected), lines[0]
        return
    assert code in (0, None), err
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert set(summary.selected_by) == {expected}
    assert list(summary.role) == ["teacher", "scratch", "distilled", "scratch", "distilled"]
    assert summary.test_metric_best_val.notna().all()
    if expected == LAST_EPOCH:  # no validation split: the last epoch, and the table says so
        assert (summary.best_epoch == summary.epochs).all()
        assert (summary.test_metric_best_val == summary.test_metric_last).all()
        assert "no validation split" in out + err
