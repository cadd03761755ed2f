"""The pipeline in-process on small data: fairness of the comparison, the teacher's
mode, the files written, best-val selection, and every seed experiment."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

from kdrun.errors import TrainingDiverged
from kdrun.models import build_model
from kdrun.report.logs import METRIC_COLUMNS, MetricsLog
from kdrun.report.table import SUMMARY_COLUMNS
from kdrun.run import pipeline
from kdrun.run.provenance import student_seeds
from kdrun.run.stages import Stages
from kdrun.store.cache import StageEntry
from kdrun.store.files import RunDir, load_checkpoint
from kdrun.train.fit import evaluate
from kdrun.train.targets import TeacherOnData
from tests.helpers import TINY, make_config, write_cifar, write_mnist

SMALL = TINY + ["dataset=synthetic", "dataset.n=300", "dataset.dim=10", "teacher=mlp",
                "teacher.hidden=[32]", "student.hidden=[16]", "trainer.batch_size=32"]


def cache(tmp_path) -> str:
    return f"cache.dir={tmp_path}/cache"


def small_config(tmp_path, *overrides):
    return make_config(cache(tmp_path), *SMALL, *overrides)


def test_ce_control_run_makes_distilled_identical_to_scratch(tmp_path):
    """With no teacher term, the distilled student must reproduce the scratch student bit
    for bit: same init, same batch order, same dropout masks, only the loss may differ."""
    cfg = small_config(tmp_path, "loss=ce", "trainer.epochs=3", "repeats=2", "student.dropout=0.3")
    result = pipeline.run(cfg, tmp_path)
    rows = {(r["role"], r["seed"]): r for r in result["rows"]}
    for seed in (0, 1):
        s, d = rows[("scratch", seed)], rows[("distilled", seed)]
        assert (s["test_metric_last"], s["val_metric_best"]) == \
            (d["test_metric_last"], d["val_metric_best"])
    a = load_checkpoint(tmp_path / "checkpoints" / "scratch.pt")["model"]
    b = load_checkpoint(tmp_path / "checkpoints" / "distilled.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "checkpoints" / "scratch.seed1.pt").exists()
    assert rows[("scratch", 0)]["test_metric_last"] != rows[("scratch", 1)]["test_metric_last"] or \
        rows[("scratch", 0)]["val_metric_best"] != rows[("scratch", 1)]["val_metric_best"]


def test_kd_run_differs_from_scratch(tmp_path):
    cfg = small_config(tmp_path, "trainer.epochs=2", "loss.alpha=1.0")
    rows = pipeline.run(cfg, tmp_path)["rows"]
    a = load_checkpoint(tmp_path / "checkpoints" / "scratch.pt")["model"]
    b = load_checkpoint(tmp_path / "checkpoints" / "distilled.pt")["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]


def test_teacher_targets_come_from_eval_mode_without_grad(tmp_path):
    cfg = small_config(tmp_path, "teacher.dropout=0.5", "trainer.float64=true")
    data = pipeline.load_data(cfg.dataset, cfg.split)
    stages = Stages(cfg, data, torch.device("cpu"), RunDir(tmp_path))
    teacher = build_model(cfg.teacher, data.input_shape, data.num_classes)
    teacher.train()  # as a framework might leave it
    logits = TeacherOnData(teacher, StageEntry(tmp_path / "c", {"n": 1}), data, stages.tcfg,
                           stages.device).logits()
    assert not logits.requires_grad
    again = TeacherOnData(teacher, StageEntry(tmp_path / "c", {"n": 2}), data, stages.tcfg,
                          stages.device).logits()
    assert torch.equal(logits, again)  # dropout off: deterministic
    teacher.eval()
    with torch.no_grad():  # in eval batches or all at once: float64 agrees to ~1e-15
        assert torch.allclose(logits, teacher(data.train.x.double()), rtol=0, atol=1e-12)


def test_outputs_have_the_documented_columns_and_checkpoints_load(tmp_path):
    cfg = small_config(tmp_path, "trainer.epochs=3")
    pipeline.run(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert METRIC_COLUMNS + ["reused", "dataset", "method", "T", "alpha", "metric",
                             "higher_is_better"] == list(metrics.columns)  # what acc holds
    assert len(metrics) == 3 * 3 * 3  # (teacher, scratch, distilled) x 3 epochs x 3 splits
    assert not metrics.duplicated(["stage", "seed", "epoch", "split"]).any()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    assert list(summary.role) == ["teacher", "scratch", "distilled"]
    data = pipeline.load_data(cfg.dataset, cfg.split)
    for _, row in summary.iterrows():
        ckpt = load_checkpoint(row.checkpoint)  # weights_only=True
        model = build_model(cfg[row.role if row.role == "teacher" else "student"],
                            ckpt["input_shape"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
        assert evaluate(model, data.test, 1000)[1] == pytest.approx(row.test_metric_last)
        assert ckpt["epoch"] == 3 and ckpt["config"]["loss"]["name"] == "kd"


def test_best_val_is_selected_on_validation_not_test(tmp_path):
    cfg = small_config(tmp_path, "trainer.epochs=6", "trainer.lr=0.05")
    pipeline.run(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    for _, row in pd.read_csv(tmp_path / "summary.csv").iterrows():
        stage = metrics[metrics.stage == row.role]
        val = stage[stage.split == "val"].set_index("epoch").score
        test = stage[stage.split == "test"].set_index("epoch").score
        best = val.idxmax()  # first epoch with the highest validation accuracy
        assert row.best_epoch == best
        assert row.test_metric_best_val == pytest.approx(test[best])
        assert row.test_metric_last == pytest.approx(test[test.index.max()])


def test_metrics_rows_are_on_disk_after_each_epoch(tmp_path):
    log = MetricsLog(tmp_path / "m.csv", {"T": 4})
    log.append([{"stage": "teacher", "epoch": 1, "split": "train", "loss": 1.0, "score": 50.0,
                 "lr": 0.1, "seconds": 0.5}], seed=0)
    with open(tmp_path / "m.csv") as f:  # a second reader, as after a kill
        rows = list(csv.DictReader(f))
    assert rows == [{"stage": "teacher", "seed": "0", "epoch": "1", "split": "train",
                     "loss": "1.0", "score": "50.0", "lr": "0.1", "seconds": "0.5",
                     "reused": "False", "T": "4"}]


def test_divergence_is_reported_with_stage_and_epoch(tmp_path):
    cfg = small_config(tmp_path, "trainer.lr=1e30", "trainer.optimizer=sgd")
    with pytest.raises(TrainingDiverged, match=r"teacher stage diverged at epoch 1"):
        pipeline.run(cfg, tmp_path)
    assert (tmp_path / "metrics.csv").exists()


def test_seed_synthetic_runs(tmp_path):
    cfg = make_config("experiment=seed_synthetic", cache(tmp_path), "progress=false",
                      "trainer.epochs=1")
    assert cfg.dataset.random_labels and cfg.loss.T == 3 and cfg.loss.alpha == 0.7
    assert list(cfg.teacher.hidden) == [256, 256, 128] and list(cfg.student.hidden) == [64]
    rows = pipeline.run(cfg, tmp_path)["rows"]
    assert {r["eval_split"] for r in rows} == {"train"}


# the fewest latency rounds allowed: a 128-channel teacher at batch 256 takes a while
FEWEST_TIMINGS = ["latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=0"]


@pytest.mark.parametrize("experiment", [
    "seed_mnist_mlp", pytest.param("seed_mnist_cnn", marks=pytest.mark.slow)])  # ~5 s
def test_seed_mnist_experiments_run_on_tiny_mnist_files(tmp_path, experiment):
    write_mnist(tmp_path / "data", n_train=64, n_test=16)
    cfg = make_config(f"experiment={experiment}", cache(tmp_path), f"dataset.root={tmp_path}/data",
                      "progress=false", "trainer.epochs=1", *FEWEST_TIMINGS)
    result = pipeline.run(cfg, tmp_path / "run")
    teacher, student = result["rows"][0], result["rows"][1]
    if experiment == "seed_mnist_mlp":
        assert (cfg.loss.T, cfg.loss.alpha, cfg.trainer.batch_size) == (7, 0.8, 64)
        assert teacher["params"] == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 12010
        assert student["params"] == 784 * 20 + 20 + 20 * 10 + 10
    else:
        assert cfg.dataset.channels == 3 and cfg.trainer.grad_clip == 1.0
        assert (cfg.loss.T, cfg.loss.alpha) == (3, 0.5)


def test_seed_cifar10_cnn_runs_on_tiny_cifar_files(tmp_path, skip_cifar_md5):
    write_cifar(tmp_path / "data", n_per_batch=8)
    cfg = make_config("experiment=seed_cifar10_cnn", cache(tmp_path),
                      f"dataset.root={tmp_path}/data",
                      "progress=false", "trainer.epochs=1")
    assert (cfg.loss.T, cfg.loss.alpha, cfg.trainer.epochs) == (10, 0.9, 1)
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert rows[0]["arch"] == "cnn[12,12]" and rows[1]["arch"] == "cnn[12]"


def test_runs_with_different_seeds_never_share_a_student_seed(tmp_path):
    seeds = [student_seeds(make_config(f"seed={s}", "repeats=3")) for s in (0, 1, 2)]
    assert seeds == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    cfg = small_config(tmp_path, "seed=1", "repeats=2")
    pipeline.run(cfg, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["distilled.pt", "distilled.seed3.pt", "scratch.pt", "scratch.seed3.pt",
                     "teacher.pt"]


@pytest.mark.parametrize("distill_from,weights", [("best_val", "best_model"), ("last", "model")])
def test_export_onnx_writes_the_weights_the_table_reports(tmp_path, caplog, distill_from,
                                                          weights):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    cfg = small_config(tmp_path, "export=onnx", "trainer.epochs=6", "trainer.lr=0.05",
                       f"trainer.distill_from={distill_from}")
    with caplog.at_level("INFO", logger="kdrun"):
        pipeline.run(cfg, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "distilled.pt")
    epoch = checkpoint["best_epoch" if distill_from == "best_val" else "epoch"]
    assert f"{distill_from} weights (epoch {epoch})" in caplog.text
    session = onnxruntime.InferenceSession(str(tmp_path / "run" / "distilled.onnx"))
    data = pipeline.load_data(cfg.dataset, cfg.split)
    x = data.test.x[:7]  # another batch size than the export's
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    outputs = {}
    for name in ("best_model", "model"):
        model = build_model(cfg.student, data.input_shape, data.num_classes)
        model.load_state_dict(checkpoint[name])
        outputs[name] = model.eval()(x)
    assert torch.allclose(torch.from_numpy(onnx_logits), outputs[weights], atol=1e-4)
    assert checkpoint["best_epoch"] < checkpoint["epoch"]  # so the two weights differ here
    other = "model" if weights == "best_model" else "best_model"
    assert not torch.allclose(torch.from_numpy(onnx_logits), outputs[other], atol=1e-4)


def test_born_again_reports_every_generation(tmp_path):
    cfg = small_config(tmp_path, "scheme=born_again", "scheme.generations=2", "repeats=2")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    roles = [r["role"] for r in rows]
    assert roles == ["teacher", "scratch", "generation1", "distilled",
                     "scratch", "generation1", "distilled"]
    assert {r["arch"] for r in rows} == {"mlp[16]"}  # the teacher: the student's architecture
    assert [r["generation"] for r in rows[2:4]] == [1, 2]
    # generation 2 learns from generation 1, not from the teacher
    material = lambda key: (tmp_path / "cache" / key / "key.json").read_text()  # noqa: E731
    assert f'"teacher": "{rows[2]["cache_key"]}"' in material(rows[3]["cache_key"])
    assert f'"teacher": "{rows[0]["cache_key"]}"' in material(rows[2]["cache_key"])
    assert (tmp_path / "run" / "checkpoints" / "generation1.pt").exists()


@pytest.mark.parametrize("how", ["arithmetic", "geometric"])
def test_ensemble_targets_are_the_mean_of_the_softened_distributions(how):
    from kdrun.run.schemes.ensemble import combine

    a, b, T = torch.randn(4, 5), torch.randn(4, 5), 3.0
    p_a, p_b = torch.softmax(a / T, 1), torch.softmax(b / T, 1)
    expected = (p_a + p_b) / 2 if how == "arithmetic" else (p_a * p_b).sqrt()
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(torch.softmax(combine([a, b], T, how) / T, 1), expected, atol=1e-6)


def test_ensemble_scheme_trains_each_member_and_reports_the_combination(tmp_path):
    cfg = small_config(tmp_path, "scheme=ensemble",
                       "scheme.teachers=[{option:mlp,hidden:[32]},{option:mlp,hidden:[8,8]}]")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "teacher1", "teacher2", "scratch", "distilled"]
    assert rows[0]["arch"] == "ensemble[mlp[32],mlp[8,8]]"
    assert rows[0]["params"] == rows[1]["params"] + rows[2]["params"]
    assert rows[4]["compression"] == pytest.approx(rows[0]["params"] / rows[4]["params"], rel=1e-3)


def test_ensemble_members_can_be_checkpoints(tmp_path):
    first = small_config(tmp_path, "teacher.hidden=[12]")
    pipeline.run(first, tmp_path / "a")
    own = tmp_path / "a" / "checkpoints" / "teacher.pt"
    cfg = small_config(tmp_path, "scheme=ensemble",
                       f"scheme.teachers=[{{option:mlp,hidden:[12],checkpoint:'{own}'}},"
                       "{option:mlp,hidden:[8]}]")
    rows = pipeline.run(cfg, tmp_path / "b")["rows"]
    assert rows[1]["arch"] == "mlp[12]" and rows[1]["epochs"] == 0 and rows[2]["epochs"] == 1


def test_cohort_member_one_starts_as_the_lone_student(tmp_path):
    from omegaconf import OmegaConf

    cfg = small_config(tmp_path)
    torch.manual_seed(3)
    lone = build_model(cfg.student, (10,), 5)
    torch.manual_seed(3)
    cohort = build_model(OmegaConf.create({"arch": "cohort", "size": 3, "member": cfg.student}),
                         (10,), 5)
    first, second = cohort.members[0].state_dict(), cohort.members[1].state_dict()
    assert all(torch.equal(v, first[k]) for k, v in lone.state_dict().items())
    assert not torch.equal(first["fc0.weight"], second["fc0.weight"])


def test_dml_trains_a_cohort_without_teacher_and_exports_its_first_member(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = small_config(tmp_path, "scheme=dml", "scheme.students=2", "export=onnx")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["scratch", "distilled"]
    assert rows[1]["arch"] == "cohort[2x mlp[16]]" and rows[1]["params"] == rows[0]["params"]
    assert (tmp_path / "run" / "distilled.onnx").exists()
    assert not any(e["stage"] == "teacher" for e in
                   map(json.loads, (tmp_path / "run" / "events.jsonl").read_text().splitlines()))


# offline with the default loss is test_every_loss_runs_end_to_end_on_the_default_data[kd]
@pytest.mark.parametrize("scheme", ["born_again", "ensemble", "dml"])
def test_every_scheme_runs_end_to_end_on_the_default_data(tmp_path, scheme):
    cfg = make_config(f"scheme={scheme}", "repeats=1", "trainer.epochs=1", "split.max_train=300",
                      "progress=false", cache(tmp_path))
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert cfg.dataset.name == "mnist1d" and rows[-1]["role"] == "distilled"
    assert all(np.isfinite(r["test_metric_last"]) for r in rows)
    # the default transfer set: a teacher labels it, so a cohort without one trains without it
    assert rows[-1]["train_unlabeled"] == (0 if scheme == "dml" else 6000)
