"""hydra/launcher=batched: students trained as one stacked model end where each would
end trained alone, and a batched sweep writes what a sequential one writes.

Stacked and alone are two orders of the same arithmetic (ROUNDING_ONLY in
kdrun/run/provenance.py), so they are compared in float64 (trainer.float64=true), within
tests.helpers.FLOAT64_WEIGHT_BOUND, which says why it holds on any machine."""

import contextlib
import json
import os
import subprocess

import pandas as pd
import pytest
import torch

from kdrun.data import load_data
from kdrun.data.augment import make_augment
from kdrun.data.labels import UNLABELED
from kdrun.losses import CE, DIST, DKD, KD
from kdrun.losses.standardized import LogitStandardKD
from kdrun.models import build_model
from kdrun.run import pipeline
from kdrun.store.files import load_checkpoint
from kdrun.train.fit import fit
from kdrun.train.stacked import Member, train_group
from kdrun.train.stacked_losses import StackedLosses
from kdrun.train.targets import CachedLogits, LiveTeacher
from tests.helpers import (
    FLOAT64_WEIGHT_BOUND,
    KDRUN,
    assert_float64_weights_agree,
    make_config,
)

FLOAT64 = "trainer.float64=true"


def member(cfg, data, role, seed, loss, model_cfg=None, teacher_logits=None,
           live_teacher=None):
    """A group member on the CPU, outside any stage cache (no entry, no run context)."""
    targets = CachedLogits(teacher_logits) if teacher_logits is not None else live_teacher
    return Member(entry=None, role=role, seed=seed, train_seed=seed,
                  model_cfg=cfg.student if model_cfg is None else model_cfg, loss=loss,
                  targets=targets, teacher_key="t" if targets is not None else None, cfg=cfg,
                  context=None, data=data, device=torch.device("cpu"))


def grid_members(cfg, data, teacher_logits):
    """Scratch and T x alpha distilled students of seeds 0 and 1 (10 members)."""
    return [member(cfg, data, "distilled", seed, loss, teacher_logits=teacher_logits)
            if loss.needs_teacher else member(cfg, data, "scratch", seed, loss)
            for seed in (0, 1)
            for loss in [CE()] + [KD(T=T, alpha=a) for T in (2.0, 4.0) for a in (0.5, 0.9)]]


def alone(member, data, tcfg, epochs, rows=None):
    """The member trained by fit() on its own; its metric rows go to ``rows``."""
    torch.manual_seed(member.train_seed)
    model = build_model(member.model_cfg, data.input_shape, data.num_classes)
    loss = type(member.loss)(**{k: v for k, v in vars(member.loss).items()
                                if k in ("T", "alpha")})
    teacher = member.targets
    augment = make_augment(member.cfg.dataset.get("augment"), data.input_shape)
    return fit(model, data, loss, tcfg, stage=member.role, epochs=epochs, seed=member.train_seed,
               device=torch.device("cpu"), teacher=teacher, augment=augment, progress=False,
               on_epoch=lambda r, snapshot: rows.extend(r) if rows is not None else None)


def stacked(members, data, tcfg, epochs):
    """The members trained as one stacked group: their results, and each one's metric
    rows by id."""
    rows = {}
    results = train_group(members, data, tcfg, epochs, torch.device("cpu"),
                          lambda m, r: rows.setdefault(id(m), []).extend(r),
                          lambda m, message: pytest.fail(message))
    return [result for _, result in results], rows


def assert_each_ends_as_alone(members, data, tcfg, epochs: int):
    """Each member of a stacked group against itself trained alone, both in float64: the
    same best-validation epoch and test accuracy, the same weights within
    FLOAT64_WEIGHT_BOUND. (Weights that close move a prediction only if its two top
    logits are within ~1e-6: with a few hundred test examples, never in practice.)
    Returns (member, stacked result, alone result, stacked metric rows) for a test's
    further checks."""
    assert tcfg.float64
    batched, rows = stacked(members, data, tcfg, epochs)
    pairs = []
    for one, result in zip(members, batched):
        expected = alone(one, data, tcfg, epochs)
        settings = {k: v for k, v in vars(one.loss).items() if isinstance(v, float)}
        what = f"{one.role} seed {one.seed} {type(one.loss).__name__} {settings}"
        assert result.best_epoch == expected.best_epoch, what
        assert_float64_weights_agree(result.best_state, expected.best_state, what)
        assert result.test_metric_best_val == expected.test_metric_best_val, what
        pairs.append((one, result, expected, rows[id(one)]))
    return pairs


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_stacked_group_ends_where_each_member_alone_ends(clip):
    cfg = make_config("split.max_train=1000", f"trainer.grad_clip={clip or 'null'}", FLOAT64)
    data = load_data(cfg.dataset, cfg.split)
    torch.manual_seed(123)
    teacher_logits = torch.randn(len(data.train), data.num_classes) * 3
    members = grid_members(cfg, data, teacher_logits)
    for _, result, expected, rows in assert_each_ends_as_alone(members, data, cfg.trainer, 2):
        ours, theirs = result.optimizer_state["state"], expected.optimizer_state["state"]
        assert ours.keys() == theirs.keys()  # one entry per parameter, as a separate Adam's
        for j, moments in theirs.items():  # Adam's moments: gradient averages, not amplified
            assert torch.equal(ours[j]["step"], moments["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                difference = float((ours[j][moment] - moments[moment]).abs().max())
                assert difference <= FLOAT64_WEIGHT_BOUND, (j, moment, difference)
        assert [r["split"] for r in rows] == ["train", "val", "test"] * 2


def test_stacked_cnn_teachers_on_sequences_end_where_each_alone_ends():
    """1-D convolutions batch on a CPU (vmap runs them as one grouped convolution): the
    default pipeline's CNN teachers of a sweep over seed train as one model."""
    cfg = make_config("split.max_train=1000", FLOAT64)
    data = load_data(cfg.dataset, cfg.split)
    assert cfg.teacher.arch == "cnn" and len(data.input_shape) == 2  # Conv1d
    members = [member(cfg, data, "teacher", seed, CE(), model_cfg=cfg.teacher)
               for seed in (0, 1)]
    assert_each_ends_as_alone(members, data, cfg.trainer, 2)


def test_stacked_students_of_a_teacher_run_on_their_augmented_batches_end_as_alone():
    """With augmentation the teacher sees each student's augmented batch, so it runs on
    every batch (LiveTeacher): once per step for all its members' batches together."""
    cfg = make_config("dataset=digits", "student=cnn", "student.channels=[8]",
                      "student.kernel_size=3", "student.hidden=[]",
                      "dataset.augment.crop_padding=1", "dataset.augment.hflip=true", FLOAT64)
    data = load_data(cfg.dataset, cfg.split)
    torch.manual_seed(5)
    teacher = LiveTeacher(build_model(cfg.teacher, data.input_shape, data.num_classes),
                          contextlib.nullcontext)
    members = [member(cfg, data, "distilled", seed, KD(T=T, alpha=0.9), live_teacher=teacher)
               for seed in (0, 1) for T in (2.0, 4.0)]
    assert_each_ends_as_alone(members, data, cfg.trainer, 2)


def test_a_stacked_group_with_a_transfer_set_ends_where_each_member_alone_ends():
    cfg = make_config("split.max_train=600", "split.labeled=200", "dataset.unlabeled=300",
                      FLOAT64)
    data = load_data(cfg.dataset, cfg.split)
    taught = data.training_on(data.distill_train())
    assert (taught.train.y == UNLABELED).sum() == 700
    torch.manual_seed(7)
    teacher_logits = torch.randn(len(taught.train), data.num_classes) * 3
    members = [m for m in grid_members(cfg, taught, teacher_logits) if m.role == "distilled"]
    batched, rows = stacked(members, taught, cfg.trainer, 2)
    train_acc = lambda rs: [r["score"] for r in rs if r["split"] == "train"]  # noqa: E731
    for one, result in zip(members, batched):
        alone_rows = []
        expected = alone(one, taught, cfg.trainer, 2, alone_rows)
        assert_float64_weights_agree(result.best_state, expected.best_state)
        # training accuracy over the 180 labelled training examples only, as fit() counts
        # it: a multiple of 100/180, and the same as the member's alone
        ours = train_acc(rows[id(one)])
        assert ours == pytest.approx(train_acc(alone_rows), rel=1e-12)
        assert all(abs(a * 180 / 100 - round(a * 180 / 100)) < 1e-6 for a in ours)


@pytest.mark.parametrize("transfer", [False, True])
def test_stacked_losses_equal_each_loss_called_alone(transfer):
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 8, 5), torch.randn(6, 8, 5)
    labels = torch.randint(0, 5, (6, 8))
    if transfer:  # transfer-set examples in the batches, one whole batch among them
        labels[:, ::3] = UNLABELED
        labels[2] = UNLABELED
    losses = [KD(T=2.0, alpha=0.5), KD(T=4.0, alpha=0.0), CE(), DKD(T=3.0, dkd_beta=2.0),
              DIST(T=2.0), LogitStandardKD(T=3.0)]
    for loss in losses:
        loss.all_labelled = not transfer  # as the stacked group sets it
    stacked = StackedLosses(losses, torch.device("cpu"), torch.float32)
    stacked.start_epoch(1)
    got = stacked(logits, teacher, labels)
    expected = torch.stack([loss(logits[i], teacher[i], labels[i])
                            for i, loss in enumerate(losses)])
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ the launcher, end to end

TINY_SWEEP = ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
              "teacher.hidden=[32]", "student.hidden=[8]", "trainer.epochs=3", "repeats=1",
              "progress=false", "num_threads=1"]


def kdrun(cwd, *args, env=None, check=True):
    cwd.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([KDRUN, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=env)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def sweep_dir(root):
    (sweep,) = (root / "outputs" / "multirun").glob("*/*")
    return sweep


def events_of(*runs):
    return [json.loads(line) for run in runs
            for line in (run / "events.jsonl").read_text().splitlines()]


def test_batched_sweep_writes_every_job_and_a_later_sequential_run_reuses_it(tmp_path):
    cache = f"cache.dir={tmp_path}/cache"
    # the reverse direction first: a stage trained by a sequential run is reused
    pipeline.run(make_config(*TINY_SWEEP, cache, "loss.T=2", "seed=0"), tmp_path / "alone")
    out = kdrun(tmp_path, "-m", "hydra/launcher=batched", *TINY_SWEEP, cache, "loss.T=2,4",
                "seed=0,1")
    # seed 1's teacher alone (seed 0's is the sequential run's); then the students not
    # trained yet: seed 1's scratch and the distilled of T=4 seed 0, T=2 and T=4 seed 1
    assert "training 1 teacher as one stacked model (mlp, epochs 1-3)" in out.stdout
    assert "training 4 students as one stacked model (mlp, epochs 1-3)" in out.stdout
    sweep = sweep_dir(tmp_path)
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        for name in ("metrics.csv", "summary.csv", "done.json", "events.jsonl",
                     ".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/teacher.pt",
                     "checkpoints/scratch.pt", "checkpoints/distilled.pt"):
            assert (job / name).is_file(), (job, name)
        metrics = pd.read_csv(job / "metrics.csv")
        assert len(metrics) == 3 * 3 * 3 and not metrics.duplicated(
            ["stage", "seed", "epoch", "split"]).any()
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 12
    # 2 teachers, 2 scratch and 4 distilled students: the sequential run's 3 alone
    assert ("Of its 8 stages, 5 trained in stacked batches (`hydra/launcher=batched`) and 3 "
            "alone") in (sweep / "report.md").read_text()
    trained_in = dict(zip(zip(summary.role, summary.seed, summary["loss.T"]),
                          summary.trained_in))
    assert trained_in[("distilled", 0, 2)] == "alone"  # the sequential run's, reused
    assert trained_in[("distilled", 1, 4)].startswith("a stacked batch of")
    assert not [e for e in events_of(*jobs) if e["event"] == "trained"]  # all in the cache

    # and a later sequential run of one of the jobs reuses every stage the launcher trained
    pipeline.run(make_config(*TINY_SWEEP, cache, "loss.T=4", "seed=1"), tmp_path / "again")
    again = events_of(tmp_path / "again")
    assert {e["event"] for e in again} == {"reused"} and len(again) == 3


@pytest.mark.slow  # a sweep of its own, ~5 s (make test < 5 min)
def test_a_sweep_over_thread_counts_trains_one_teacher(tmp_path):
    """CPU threads only reorder the arithmetic: outside every stage key (the reuse rule)."""
    args = [arg for arg in TINY_SWEEP if not arg.startswith("num_threads")]
    kdrun(tmp_path, "-m", *args, "num_threads=1,2")
    summary = pd.read_csv(sweep_dir(tmp_path) / "summary.csv")
    assert len(summary) == 2 * 3 and summary.cache_key.nunique() == 3  # one of each stage
    assert summary[summary.role == "teacher"].cache_key.nunique() == 1
    assert "threads" in summary and summary.threads.notna().all()


@pytest.mark.slow  # two sweeps of 8 jobs
def test_batched_and_sequential_sweeps_agree(tmp_path):
    # in float64: two orders of the same arithmetic (tests.helpers.FLOAT64_WEIGHT_BOUND)
    args = [*TINY_SWEEP, "loss.T=2,4", "loss.alpha=0.5,0.9", "seed=0,1", FLOAT64]
    for launcher in ("basic", "batched"):
        kdrun(tmp_path / launcher, "-m", f"hydra/launcher={launcher}", *args)
    rows = {}
    for launcher in ("basic", "batched"):
        summary = pd.read_csv(sweep_dir(tmp_path / launcher) / "summary.csv")
        rows[launcher] = summary.set_index(["job", "role"]).sort_index()
    basic, batched = rows["basic"], rows["batched"]
    assert list(basic.index) == list(batched.index) and len(basic) == 24
    # weights within 1e-6 (tests above): the same predictions, so the same accuracies
    assert (basic.test_metric_best_val == batched.test_metric_best_val).all()
    assert (basic.best_epoch == batched.best_epoch).all()
    assert (basic.trained_in == "alone").all()
    assert "stacked batches" not in (sweep_dir(tmp_path / "basic") / "report.md").read_text()
    assert batched.trained_in.str.startswith("a stacked batch of").all()  # teachers too


@pytest.mark.slow  # three sweeps
def test_a_batched_group_killed_mid_way_resumes_and_ends_as_an_unbroken_one(tmp_path):
    kill_at = "rows:distilled:3"  # epoch 2's rows of a distilled member: epoch 1's state saved
    from tests.test_faults import KILLER

    (tmp_path / "killer").mkdir()
    (tmp_path / "killer" / "sitecustomize.py").write_text(KILLER)
    args = ["-m", "hydra/launcher=batched", *TINY_SWEEP, "loss.T=2,4", "seed=0"]
    kdrun(tmp_path / "clean", *args)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(tmp_path / "killer"), env.get("PYTHONPATH")])))
    killed = tmp_path / "killed"
    out = kdrun(killed, *args, env={**env, "KDRUN_KILL_AT": kill_at}, check=False)
    assert out.returncode == -9 and f"killing at {kill_at}" in out.stderr, out.stderr[-2000:]
    assert list((killed / "outputs" / "cache" / "groups").glob("*.pt"))  # epoch 1's state
    out = kdrun(killed, *args, f"hydra.sweep.dir={sweep_dir(killed)}", env=env)
    assert "epochs 2-3" in out.stdout  # resumed after epoch 1, not from the start
    for job in sorted(d for d in sweep_dir(killed).iterdir() if d.is_dir()):
        clean_job = sweep_dir(tmp_path / "clean") / job.name
        metrics = pd.read_csv(job / "metrics.csv")
        assert not metrics.duplicated(["stage", "seed", "epoch", "split"]).any()
        assert len(metrics) == len(pd.read_csv(clean_job / "metrics.csv"))
        for role in ("scratch", "distilled"):
            ours = load_checkpoint(job / "checkpoints" / f"{role}.pt")["model"]
            theirs = load_checkpoint(clean_job / "checkpoints" / f"{role}.pt")["model"]
            for name, tensor in theirs.items():
                torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


@pytest.mark.slow  # an Optuna study
def test_optuna_hands_its_n_jobs_trials_to_the_batched_launcher_at_once(tmp_path):
    out = kdrun(tmp_path, "hparams_search=kd_optuna", "hydra/launcher=batched",
                "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=4", *TINY_SWEEP)
    # one teacher, then one scratch student and the four trials' distilled students
    assert "training 5 students as one stacked model (mlp, epochs 1-3)" in out.stdout
    summary = pd.read_csv(sweep_dir(tmp_path) / "summary.csv")
    distilled = summary[summary.role == "distilled"]
    assert len(distilled) == 4 and distilled["loss.T"].nunique() == 4
    assert distilled.trained_in.eq("a stacked batch of 5").all()


def test_the_launcher_composes_jobs_as_hydra_does():
    """Each job's config, Hydra's node included, equals Hydra's own composition, though
    the launcher composes once per set of structural overrides."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from kdrun.sweep.compose import compose_each_job_once

    jobs = [["loss.T=2", "loss.alpha=0.5", "seed=0"], ["loss.T=8", "loss.alpha=0.9", "seed=0"],
            ["seed=1", "loss.T=2", "trainer.lr=0.1"], ["loss=dkd", "loss.T=2"],
            ["loss=dkd", "loss.dkd_beta=4.0", "+student.extra=1"], ["loss.T=4"]]
    with initialize_config_module("kdrun.configs", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", ["hydra/launcher=batched"],
                                           run_mode=RunMode.MULTIRUN)
        hydras = [loader.load_sweep_config(master, list(job)) for job in jobs]
        compose = loader.load_sweep_config
        calls = []
        loader.load_sweep_config = lambda m, o: calls.append(o) or compose(m, o)
        compose_each_job_once(loader)
        ours = [loader.load_sweep_config(master, list(job)) for job in jobs]
        again = [loader.load_sweep_config(master, list(job)) for job in jobs]  # the launcher's
    plain = lambda c: OmegaConf.to_container(c, resolve=False)  # noqa: E731
    for job, theirs, mine, second in zip(jobs, hydras, ours, again):
        assert plain(mine) == plain(theirs), job
        assert plain(second) == plain(theirs) and second is not mine
    assert len(calls) == 5  # seed=0, seed=1, loss=dkd, loss=dkd with +student.extra, none


def test_top_k_teacher_targets_are_refused_by_the_plan_and_train_alone(tmp_path):
    """A target kind that does not stack says so (its stack_refusal): the job trains its
    students on its own. (The planner used to pass top-k targets on as "no teacher", and
    the stacked pass failed with a traceback.)"""
    from kdrun.sweep.batched import plan_job
    from kdrun.train.stacked import NotBatchable

    cfg = make_config(*TINY_SWEEP, "trainer.teacher_topk=3", f"cache.dir={tmp_path}/cache")
    with pytest.raises(NotBatchable, match="its teacher targets are top-k logits"):
        plan_job(cfg, tmp_path / "plan")
    assert plan_job(make_config(*TINY_SWEEP, f"cache.dir={tmp_path}/cache"),
                    tmp_path / "plan2")  # the same job with every logit plans its students
