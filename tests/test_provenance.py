"""A stage is reused only when a fresh computation would give the same numbers.

Every entry of the one list of settings without effect (provenance.NO_EFFECT) is
flipped: the stages keep their keys, and training them afresh gives bit-identical
weights. Every setting that can change numbers is flipped too: a stage that depends
on it gets another key."""

from __future__ import annotations

import pytest
import torch

from kdrun import pipeline, provenance
from kdrun.cache import stage_key
from kdrun.data import fingerprint, load_data
from kdrun.store import load_checkpoint
from tests.helpers import make_config, write_mnist

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
}


def test_every_no_effect_entry_has_a_flip():
    assert set(FLIPS) == set(provenance.NO_EFFECT)


def run(tmp, name, *overrides):
    out = tmp / name
    result = pipeline.run(make_config(*TINY, f"cache.dir={tmp}/cache_{name}", *overrides), out)
    keys = {r["role"]: r["cache_key"] for r in result["rows"]}
    weights = {role: load_checkpoint(out / "checkpoints" / f"{role}.pt")["model"]
               for role in ROLES}
    return keys, weights


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"), "base")


@pytest.mark.parametrize("entry", [k for k, v in FLIPS.items() if v])
def test_a_setting_without_effect_keeps_the_key_and_the_weights_bit_for_bit(tmp_path, base,
                                                                           entry):
    keys, weights = run(tmp_path, "flipped", FLIPS[entry].format(tmp=tmp_path))
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
                                               numerics=numerics, data_digest=data, extra=extra))


@pytest.mark.parametrize("override", [
    "trainer.fused_optimizer=false", "trainer.compile=true", "trainer.eval_batch_size=37",
    "trainer.lr=0.001", "trainer.on_nan=skip", "split.standardize=false", "student.hidden=[9]",
])
def test_a_setting_that_can_change_numbers_changes_the_key(override):
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


def test_cpu_threads_and_the_torch_version_are_in_the_key(monkeypatch):
    cfg = make_config(*TINY)
    before = material(cfg)
    threads = torch.get_num_threads()
    try:  # two threads reduce in another order than one: other weights (measured)
        torch.set_num_threads(threads + 1)
        assert material(cfg) != before
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert material(cfg) != before


def test_cuda_switches_count_on_cuda_and_are_resolved_away_on_cpu(monkeypatch):
    monkeypatch.setattr(provenance, "fused_kernel_exists", lambda optimizer, device: True)
    cuda = torch.device("cuda")
    for switch in ("amp", "tf32", "cudnn_benchmark", "channels_last"):
        on, off = make_config(*TINY), make_config(*TINY, f"trainer.{switch}=false")
        assert material(on, device=cuda) != material(off, device=cuda), switch
        assert material(on) == material(off), switch  # nothing of it runs on a CPU
    cfg = make_config(*TINY)
    assert provenance.numerics(cfg.trainer, cuda)["precision"] == "bf16-autocast"
    assert material(cfg, device=cuda) != material(cfg)  # device type: a GPU run is another stage


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
