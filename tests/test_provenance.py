"""The reuse rule: a stage key holds what defines the computation up to floating-point
rounding, and nothing else.

Every entry of the list of settings without effect (provenance.NO_EFFECT) is flipped:
the stages keep their keys, and training them afresh gives bit-identical weights. Every
entry of the list of settings that only reorder the arithmetic (ROUNDING_ONLY) is
flipped: the stages keep their keys, and trained afresh in float64 their weights agree
within tests.helpers.FLOAT64_WEIGHT_BOUND. Every setting that defines the computation
is flipped too: a stage that depends on it gets another key."""

from __future__ import annotations

import os

import pytest
import torch

from kdrun.data import fingerprint, load_data
from kdrun.run import pipeline, provenance
from kdrun.store.cache import stage_key
from kdrun.store.files import load_checkpoint
from tests.helpers import assert_float64_weights_agree, make_config, write_mnist

TINY = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
        "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]", "trainer.epochs=2",
        "repeats=1", "progress=false", "num_threads=1"]
ROLES = ("teacher", "scratch", "distilled")

# each NO_EFFECT entry, flipped away from the default
FLIPS = {
    "progress": "progress=true",
    "logger": "logger=tensorboard",
    "output_root": "output_root={tmp}/elsewhere",
    "cache.enabled": "cache.enabled=false",
    "cache.dir": "cache.dir={tmp}/other_cache",
    "export": "export=onnx",
    "latency.repeats_b1": "latency.repeats_b1=5",
    "latency.repeats_b256": "latency.repeats_b256=4",
    "latency.warmup": "latency.warmup=0",
    "hparams_search": None,  # selects the sweeper: compared as composed configs below
    "trainer.checkpoint_every": "trainer.checkpoint_every=0",
    "distributed.timeout_min": "distributed.timeout_min=5",
    "slurm.vanished_after_s": "slurm.vanished_after_s=60",
    "search.objectives": "search.objectives=[val_metric,params]",
    "search.tolerance": "search.tolerance=2.5",
}


def test_every_no_effect_entry_has_a_flip():
    assert set(FLIPS) == set(provenance.NO_EFFECT)


def run(tmp, name, *overrides):
    out = tmp / name
    result = pipeline.run(make_config(*TINY, f"cache.dir={tmp}/cache_{name}", *overrides), out)
    keys = {r["role"]: r["cache_key"] for r in result["rows"]}
    weights = {role: load_checkpoint(out / "checkpoints" / f"{role}.pt")["model"]
               for role in ROLES}
    return keys, weights, result["rows"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"), "base")


# each ROUNDING_ONLY entry, flipped away from TINY's (None: flipped by another test)
ROUNDING_FLIPS = {
    "processor": None,  # the machine: no flip on one machine; recorded (test below)
    "hydra/launcher": None,  # stacked vs alone: tests/test_batched.py, in float64 too
    "processes": None,  # torchrun's processes: tests/test_distributed.py, in float64 too
    "distributed.backend": None,  # acts with several processes only: tests/test_distributed.py
    "num_threads": "num_threads=2",
    "one_thread_below_mflop": None,  # num_threads=auto's count: tests/test_threads.py
    "trainer.loss_chunk_rows": "trainer.loss_chunk_rows=7",
    "trainer.fused_optimizer": "trainer.fused_optimizer=false",
    "trainer.eval_batch_size": "trainer.eval_batch_size=37",
    "trainer.compile": None,  # slow: test_compiled_training_... below
    "trainer.cudnn_benchmark": "trainer.cudnn_benchmark=false",  # acts on CUDA only
    "trainer.channels_last": "trainer.channels_last=false",  # acts on CUDA only
}
FLOAT64 = "trainer.float64=true"


def test_every_rounding_only_entry_has_a_flip_and_no_entry_is_also_in_no_effect():
    assert set(ROUNDING_FLIPS) == set(provenance.ROUNDING_ONLY)
    assert not set(provenance.ROUNDING_ONLY) & set(provenance.NO_EFFECT)


@pytest.fixture(scope="module")
def base64(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base64"), "base64", FLOAT64)


def assert_rounding_only(flipped, base, entry):
    """The same stage keys, the same selected epochs, weights within the float64 bound,
    and the flipped setting recorded in the rows."""
    keys, weights, rows = flipped
    assert keys == base[0], entry  # the same key: a cached stage would be reused
    for role in ROLES:
        assert_float64_weights_agree(weights[role], base[1][role], f"{entry} {role}")
    for ours, theirs in zip(rows, base[2]):
        assert ours["best_epoch"] == theirs["best_epoch"]
        assert ours["precision"] == theirs["precision"] == "fp64"
    column = provenance.ROUNDING_ONLY[entry][0]
    return [row[column] for row in rows], [row[column] for row in base[2]]


@pytest.mark.parametrize("entry", [k for k, v in ROUNDING_FLIPS.items() if v])
def test_a_rounding_only_setting_keeps_the_key_and_in_float64_the_weights(tmp_path, base64,
                                                                          entry):
    ours, theirs = assert_rounding_only(run(tmp_path, "flipped", FLOAT64, ROUNDING_FLIPS[entry]),
                                        base64, entry)
    if entry in ("trainer.cudnn_benchmark", "trainer.channels_last"):
        assert ours == theirs == [False] * 3  # recorded as off: it does nothing on a CPU
    elif entry != "num_threads" or (os.cpu_count() or 1) > 1:
        assert set(ours) != set(theirs)  # recorded: each row says what it ran with


@pytest.mark.slow  # torch.compile builds its kernels with the C++ compiler
def test_compiled_training_keeps_the_key_and_in_float64_the_weights(tmp_path, base64):
    ours, theirs = assert_rounding_only(run(tmp_path, "compiled", FLOAT64, "trainer.compile=true"),
                                        base64, "trainer.compile")
    assert ours == [True] * 3 and theirs == [False] * 3


def test_every_row_records_the_processor_threads_and_how_it_was_trained(base):
    for row in base[2]:
        assert row["processor"] == provenance.processor_name(CPU) and row["processor"]
        assert row["threads"] == 1 and row["trained_in"] == "alone"
        assert {column for column, _ in provenance.ROUNDING_ONLY.values()} <= set(row)


@pytest.mark.parametrize("entry", [k for k, v in FLIPS.items() if v])
def test_a_setting_without_effect_keeps_the_key_and_the_weights_bit_for_bit(tmp_path, base,
                                                                           entry):
    keys, weights, _ = run(tmp_path, "flipped", FLIPS[entry].format(tmp=tmp_path))
    assert keys == base[0]  # the same key: a cached stage would be reused
    for role in ROLES:  # and computed afresh, the same numbers
        for name, tensor in base[1][role].items():
            assert torch.equal(weights[role][name], tensor), (entry, role, name)


def test_hparams_search_changes_nothing_in_a_jobs_config():
    plain, searched = make_config(*TINY), make_config(*TINY, "hparams_search=kd_optuna")
    assert provenance.config_hash(plain) == provenance.config_hash(searched)


CPU = torch.device("cpu")


def material(cfg, role="teacher", device=CPU, numerics=None, data="d" * 20, **extra):
    numerics = numerics or provenance.numerics(cfg.trainer, device)
    model = cfg.teacher if role == "teacher" else cfg.student
    return stage_key(provenance.stage_material(cfg, role=role, model_cfg=model, seed=0, epochs=2,
                                               numerics=numerics, data_digest=data, adds=extra))


@pytest.mark.parametrize("override", [
    "trainer.lr=0.001", "trainer.on_nan=skip", "split.standardize=false", "student.hidden=[9]",
    "trainer.float64=true", "trainer.optimizer=sgd", "trainer.schedule=none",
    "trainer.batch_size=50", "trainer.weight_decay=0.1", "trainer.grad_clip=1.0",
    "split.labeled=100", "split.seed=1", "split.val_fraction=0.2", "dataset.n=301",
    "trainer.accumulate=2", "trainer.schedule_unit=step", "trainer.min_lr=0.001",
    "trainer.schedule=linear", "trainer.betas=[0.9,0.99]",
])
def test_a_setting_that_defines_the_computation_changes_the_key(override):
    base, flipped = make_config(*TINY), make_config(*TINY, override)
    role = "scratch" if override.startswith("student") else "teacher"
    assert material(base, role) != material(flipped, role)


def test_a_distilled_student_is_not_reused_across_cached_and_live_teacher_targets(tmp_path):
    import json

    cfg = make_config(*TINY, f"cache.dir={tmp_path}/cache")
    pipeline.run(cfg, tmp_path / "cached")
    live = make_config(*TINY, f"cache.dir={tmp_path}/cache", "trainer.cache_teacher_logits=false")
    pipeline.run(live, tmp_path / "live")
    lines = (tmp_path / "live" / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert {e["stage"]: e["event"] for e in events} == {
        "teacher": "reused", "scratch": "reused", "distilled": "trained"}


def test_cpu_threads_stay_out_of_the_key_and_the_torch_version_is_in_it(monkeypatch):
    cfg = make_config(*TINY)
    before = material(cfg)
    threads = torch.get_num_threads()
    try:  # another reduction order: the same computation up to rounding (tests above)
        torch.set_num_threads(threads + 1)
        assert material(cfg) == before
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert material(cfg) != before


def test_precision_is_keyed_as_resolved_on_the_device():
    cuda = torch.device("cuda")
    precision = {}
    for switches in ([], ["trainer.amp=false"], ["trainer.tf32=false"],
                     ["trainer.amp=false", "trainer.tf32=false"], ["trainer.float64=true"]):
        cfg = make_config(*TINY, *switches)
        precision[tuple(switches)] = provenance.numerics(cfg.trainer, cuda)["precision"]
        assert provenance.numerics(cfg.trainer, CPU)["precision"] == (
            "fp64" if switches == ["trainer.float64=true"] else "fp32")
    assert list(precision.values()) == ["bf16-autocast+tf32", "tf32", "bf16-autocast", "fp32",
                                        "fp64"]
    on, off = make_config(*TINY), make_config(*TINY, "trainer.amp=false")
    assert material(on, device=cuda) != material(off, device=cuda)
    assert material(on) == material(off)  # autocast does nothing on a CPU: resolved away
    assert material(on, device=cuda) != material(on)  # device type: a GPU run is another stage


def test_distilled_key_holds_teacher_loss_and_how_the_targets_were_made():
    cfg = make_config(*TINY)
    common = {"loss": {"name": "kd"}, "teacher": "t1", "distill_from": "best_val"}
    cached = material(cfg, "distilled", teacher_targets="CachedLogits", **common)
    assert cached != material(cfg, "distilled", teacher_targets="LiveTeacher", **common)
    assert cached != material(cfg, "distilled", teacher_targets="CachedLogits",
                              **{**common, "teacher": "t2"})


def test_data_on_disk_is_keyed_by_content_not_by_path(tmp_path):
    for name in ("a", "b"):
        write_mnist(tmp_path / name)
    cfg = make_config("dataset=mnist", f"dataset.root={tmp_path}/a")
    other_path = make_config("dataset=mnist", f"dataset.root={tmp_path}/b")
    first = fingerprint(load_data(cfg.dataset, cfg.split))
    assert fingerprint(load_data(other_path.dataset, other_path.split)) == first
    assert material(cfg, data=first) == material(other_path, data=first)  # same files: reused
    write_mnist(tmp_path / "c", seed=1)  # same names, other images and labels
    changed = make_config("dataset=mnist", f"dataset.root={tmp_path}/c")
    assert fingerprint(load_data(changed.dataset, changed.split)) != first


def test_a_given_teacher_is_keyed_by_the_architecture_that_loads_it():
    cfg = make_config(*TINY, "teacher.checkpoint=t.pt")
    other = make_config(*TINY, "teacher.checkpoint=t.pt", "teacher.dropout=0.5")
    numerics = provenance.numerics(cfg.trainer, torch.device("cpu"))
    keys = [stage_key(provenance.given_teacher_material(c, c.teacher, "f" * 64, "best_model",
                                                        numerics, "d" * 20))
            for c in (cfg, other)]
    assert keys[0] != keys[1]  # same file, another model: its logits may differ


def test_born_again_generations_never_share_a_seed_stream_with_their_teacher(tmp_path):
    cfg = make_config(*TINY, "scheme=born_again", "scheme.generations=2",
                      f"cache.dir={tmp_path}/cache")
    result = pipeline.run(cfg, tmp_path / "run")
    teacher = load_checkpoint(tmp_path / "run" / "checkpoints" / "teacher.pt")
    scratch = load_checkpoint(tmp_path / "run" / "checkpoints" / "scratch.pt")
    assert teacher["rng_seed"] != scratch["rng_seed"] == 0
    generation1 = load_checkpoint(tmp_path / "run" / "checkpoints" / "generation1.pt")
    distilled = load_checkpoint(tmp_path / "run" / "checkpoints" / "distilled.pt")
    seeds = {teacher["rng_seed"], generation1["rng_seed"], distilled["rng_seed"]}
    assert len(seeds) == 3 and distilled["rng_seed"] == 0  # the last one pairs with scratch
    assert [r["role"] for r in result["rows"]] == ["teacher", "scratch", "generation1",
                                                   "distilled"]
