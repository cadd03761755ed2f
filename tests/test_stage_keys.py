"""Stage keys are the cache's addresses: moving or reorganising code must not change
them, or every cached stage would silently be trained again. tests/stage_keys.json
holds the keys of a few small runs, recorded before the package was reorganised into
sub-packages; the same runs today must give the same keys. (The torch version is a part
of every key: it is pinned here, so that the recorded keys hold under any torch.)

To record them anew after a change that is *meant* to change keys:
    python -m tests.test_stage_keys
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from kdrun.run import pipeline
from tests.helpers import make_config

RECORDED = Path(__file__).parent / "stage_keys.json"
TINY = ["dataset=synthetic", "dataset.n=200", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[16]", "student=mlp", "student.hidden=[8]", "trainer.epochs=1",
        "repeats=2", "progress=false", "num_threads=1"]
RUNS = {
    "kd": [],
    "dkd": ["loss=dkd"],
    "fitnet": ["loss=fitnet"],
    "transfer set": ["split.labeled=100", "dataset.unlabeled=50", "all_labels_reference=true"],
    "born again": ["scheme=born_again", "scheme.generations=2"],
    "dml": ["scheme=dml"],
    "ensemble": ["scheme=ensemble", "scheme.teachers=[{option: mlp, hidden: [8]},{option: mlp}]"],
    "float64": ["trainer.float64=true", "trainer.lr=0.001"],
}


def current_keys(monkeypatch_version) -> dict:
    """Each run's summary rows as role/seed -> stage key, under a pinned torch version."""
    monkeypatch_version("0.0.0-pinned")
    keys = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            cfg = make_config(*TINY, *overrides, f"cache.dir={tmp}/cache_{len(keys)}")
            rows = pipeline.run(cfg, Path(tmp) / f"run{len(keys)}")["rows"]
            keys[name] = {f"{row['role']}/{row['seed']}": row["cache_key"]
                          if isinstance(row["cache_key"], str) else None for row in rows}
    return keys


def test_stage_keys_are_the_ones_recorded_before_the_code_moved(monkeypatch):
    keys = current_keys(lambda version: monkeypatch.setattr(torch, "__version__", version))
    assert keys == json.loads(RECORDED.read_text())


if __name__ == "__main__":
    recorded = current_keys(lambda version: setattr(torch, "__version__", version))
    RECORDED.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(map(len, recorded.values()))} stage keys in {RECORDED}", file=sys.stderr)
