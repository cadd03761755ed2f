"""A damaged stage-cache file is caught before it is used: one warning line, the stage
computed again, the run finishes, and no run directory's checkpoint is harmed."""

from __future__ import annotations

import logging

import pytest
import torch

from kdrun.run import pipeline
from kdrun.store.cache import SET_ASIDE, StageEntry
from kdrun.store.cache import main as kdrun_cache
from kdrun.store.files import load_checkpoint
from tests.helpers import make_config, run_events

TINY = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]", "trainer.epochs=2",
        "repeats=1", "progress=false", "num_threads=1"]
ROLES = ("teacher", "scratch", "distilled")


def damage(path, how):
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "garble":  # not even text any more
        path.write_bytes(b"\xff" + data[1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def run(tmp, name):
    cfg = make_config(*TINY, f"cache.dir={tmp}/cache")
    return {r["role"]: r for r in pipeline.run(cfg, tmp / name)["rows"]}


@pytest.mark.parametrize("role,name,how", [
    ("teacher", "result.pt", "flip"),
    ("scratch", "result.pt", "truncate"),
    ("distilled", "result.pt", "delete"),
    ("distilled", "summary.json", "flip"),
    ("scratch", "summary.json", "delete"),
    ("scratch", "rows.csv", "delete"),
    ("teacher", "summary.json", "truncate"),
    ("scratch", "summary.json", "garble"),
    ("distilled", "rows.csv", "flip"),
    ("teacher", "logits-best_val.pt", "truncate"),
    ("teacher", "logits-best_val.pt", "delete"),
])
def test_a_damaged_cache_file_is_caught_recomputed_and_never_reaches_a_run(tmp_path, caplog,
                                                                          role, name, how):
    first = run(tmp_path, "a")
    entry = tmp_path / "cache" / first[role]["cache_key"]
    damage(entry / name, how)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        second = run(tmp_path, "b")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert name in warnings[0] or "missing" in warnings[0], warnings
    stage_events = {e["stage"]: e["event"] for e in run_events(tmp_path / "b")}
    if name.startswith("logits"):  # the teacher stage is intact: only its logits are redone
        assert StageEntry.at(entry).problem() is None
    else:
        assert stage_events[role] == "trained"
        assert list((tmp_path / "cache" / SET_ASIDE).iterdir())  # kept for a post-mortem
    for r in ROLES:  # recomputed, the same numbers as before; both runs' files load
        assert second[r]["test_metric_best_val"] == first[r]["test_metric_best_val"]
        a = load_checkpoint(tmp_path / "a" / "checkpoints" / f"{r}.pt")["model"]
        b = load_checkpoint(tmp_path / "b" / "checkpoints" / f"{r}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_resume_state_restarts_the_stage_with_a_warning(tmp_path, caplog):
    entry = StageEntry(tmp_path, {"stage": "teacher"})
    entry.start()
    entry.save_state({"epoch": 3, "model": {"w": torch.ones(4)}})
    assert entry.start()["epoch"] == 3
    damage(entry.state_pt, "flip")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert entry.start() is None
    assert "state.pt does not match its checksum" in caplog.text
    entry.save_state({"epoch": 4})
    damage(entry.state_pt, "truncate")
    assert entry.start() is None
    entry.append_rows([{"stage": "teacher", "epoch": 1, "split": "val", "loss": 0.5,
                        "score": 80.0, "lr": 0.1, "seconds": 1.0}])
    entry.save_state({"epoch": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        damage(entry.state_pt, "delete")
        assert entry.start() is None and entry.read_rows() == []
    assert "no state.pt" in caplog.text


def test_kdrun_cache_verify_lists_damaged_entries_and_exits_1(tmp_path, capsys):
    rows = run(tmp_path, "a")
    assert kdrun_cache(["verify", str(tmp_path / "cache")]) == 0
    assert "3 stages checked, all intact" in capsys.readouterr().out
    damage(tmp_path / "cache" / rows["scratch"]["cache_key"] / "result.pt", "flip")
    assert kdrun_cache(["verify", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert rows["scratch"]["cache_key"] in out and "result.pt does not match" in out
    assert rows["teacher"]["cache_key"] not in out
    assert kdrun_cache(["verify", "--set-aside", str(tmp_path / "cache")]) == 1
    assert kdrun_cache(["verify", str(tmp_path / "cache")]) == 0
    (tmp_path / "cache" / rows["teacher"]["cache_key"] / "logits-best_val.pt").unlink()
    assert kdrun_cache(["verify", str(tmp_path / "cache")]) == 1
    assert "logits-best_val.pt is missing" in capsys.readouterr().out


def test_a_given_teachers_deleted_logits_are_noticed_too(tmp_path, caplog):
    run(tmp_path, "a")
    own = tmp_path / "a" / "checkpoints" / "teacher.pt"
    cfg = make_config(*TINY, f"cache.dir={tmp_path}/cache", f"teacher.checkpoint={own}")
    rows = pipeline.run(cfg, tmp_path / "b")["rows"]
    entry = tmp_path / "cache" / rows[0]["cache_key"]
    (entry / "logits-best_val.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        again = pipeline.run(cfg, tmp_path / "c")["rows"]
    assert "logits-best_val.pt is missing" in caplog.text
    assert again[2]["test_metric_best_val"] == rows[2]["test_metric_best_val"]


def test_an_entry_written_with_the_old_acc_names_reads_with_todays(tmp_path):
    """A stage cached before the metric columns were renamed (acc -> score, val_acc_best
    -> val_metric_best, ...) is reused as it is: its rows and summary read renamed, and a
    resumed stage's new rows land under the old header's same positions."""
    entry = StageEntry(tmp_path, {"stage": "teacher"})
    entry.start()
    entry.rows_csv.write_text("stage,epoch,split,loss,acc,lr,seconds\n"
                              "teacher,1,val,0.5,80.0,0.1,1.0\n")
    entry.append_rows([{"stage": "teacher", "epoch": 2, "split": "val", "loss": 0.4,
                        "score": 82.0, "lr": 0.1, "seconds": 1.0}])
    assert [(r["epoch"], r["score"]) for r in entry.read_rows()] == [(1, 80.0), (2, 82.0)]
    entry.finish(checkpoint={"w": torch.ones(1)},
                 summary={"role": "teacher", "val_acc_best": 82.0, "test_acc_last": 81.0,
                          "test_acc_best_val": 81.0})
    assert entry.summary() == {"role": "teacher", "val_metric_best": 82.0,
                               "test_metric_last": 81.0, "test_metric_best_val": 81.0}
