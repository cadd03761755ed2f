"""Language models as users bring them (issue 38): pretrained pairs whose output rows pad
one tokenizer differently, tokenizers compared id by id, exact top-k targets in float32,
the memory plan before training, and the objective as computed."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError, DataError, UserError
from kdrun.train.targets import TopKLogits, topk_targets
from tests.helpers import KDRUN, make_config
from tests.lm_pairs import padded_pair, pretrained_lm, word_tokenizer

transformers = pytest.importorskip("transformers")

QUICK = ["dataset=text_lm", "dataset.seq_len=16", "teacher=hf_lm", "student=hf_lm",
         "trainer.epochs=1", "trainer.batch_size=16", "repeats=1", "progress=false",
         "num_threads=1", "latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=0"]


def pair_overrides(teacher, student, text, tokenizer=None) -> list[str]:
    return [*QUICK, f"dataset.files={text}", f"dataset.tokenizer={tokenizer or teacher}",
            f"teacher.name={teacher}", f"student.name={student}"]


# ------------------------------------------------------------- padded vocabularies


def test_a_padded_pretrained_pair_distils_and_drops_the_padding_rows(tmp_path, caplog):
    from kdrun.models import build_model
    from kdrun.run import pipeline

    teacher, student, text = padded_pair(tmp_path)
    cfg = make_config(*pair_overrides(teacher, student, text), f"cache.dir={tmp_path}/cache")
    with caplog.at_level(logging.INFO, logger="kdrun"):
        rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(1 < r["test_metric_best_val"] < 500 for r in rows)  # perplexity over 500 tokens
    said = caplog.text
    assert "vocabulary: 500 tokens" in said
    assert f"teacher.name={teacher}: 576 output rows, 76 of them padding; its tokenizer " \
           "equals the data's, id by id" in said
    assert f"student.name={student}: 512 output rows, 12 of them padding" in said
    model = build_model(cfg.teacher, (16,), 500)  # the logits span the tokenizer's tokens only
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 500)


def test_a_tokenizer_that_differs_in_one_token_is_refused_naming_it(tmp_path):
    from kdrun.run import pipeline

    teacher, student, text = padded_pair(tmp_path, rename={7: "cow"})
    cfg = make_config(*pair_overrides(teacher, student, text), f"cache.dir={tmp_path}/cache")
    data_token = word_tokenizer(500).convert_ids_to_tokens(7)
    with pytest.raises(DataError, match=rf"student.name=.*its tokenizer differs from the "
                                        rf"data's .* at id 7: '{data_token}' in the data's, "
                                        r"'cow' in the model's"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # refused before anything trained


def test_fewer_rows_than_tokens_and_bytes_for_a_model_with_a_tokenizer_are_one_line(tmp_path):
    from kdrun.run import pipeline

    teacher, student, text = padded_pair(tmp_path)
    narrow = pretrained_lm(tmp_path / "narrow", 400)  # no tokenizer of its own
    with pytest.raises(DataError, match="its output has 400 rows, fewer than the 500 tokens"):
        pipeline.run(make_config(*pair_overrides(teacher, narrow, text)), tmp_path / "a")
    with pytest.raises(DataError, match=rf"teacher.name={teacher} has its own tokenizer, and "
                                        rf"the data is tokenized as bytes: set "
                                        rf"dataset.tokenizer={teacher}"):
        pipeline.run(make_config(*pair_overrides(teacher, student, text, "bytes")), tmp_path / "b")


@pytest.mark.slow  # the installed command, as the README shows it (~20 s)
def test_the_padded_pair_from_the_command_line(tmp_path):
    teacher, student, text = padded_pair(tmp_path)
    p = subprocess.run([KDRUN, *pair_overrides(teacher, student, text),
                        f"cache.dir={tmp_path}/cache"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("objective: distilled student = 0.9 * T^2 (=16) * KL(p_t || p_s)")
    assert any("76 of them padding" in line for line in lines)
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    summary = pd.read_csv(run / "summary.csv")
    assert summary.objective[2].startswith("0.9 * T^2 (=16) * KL(p_t || p_s) at T=4")
    assert summary.objective[0] == "CE(label, model) mean over every position of a batch"


# ---------------------------------------------------------------- exact top-k targets


def peaked_logits(rows: int = 500, classes: int = 1000, peak: float = 20.0) -> torch.Tensor:
    """A confident teacher: one logit ``peak`` above standard-normal others, so that the
    mass outside the top k is ~3e-6, where 1 - kept cancels in float32."""
    z = torch.randn(rows, classes, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    z[:, 0] += peak
    return z


def rebuilt(logits: torch.Tensor, k: int) -> torch.Tensor:
    return TopKLogits(*topk_targets(logits, k), logits.shape[-1]).dense(
        torch.arange(len(logits))).double()


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    return float((log_s.exp() * (log_s - log_t)).sum(-1).mean())


def test_float32_top_k_equals_the_float64_construction_on_a_confident_teacher():
    z = peaked_logits()
    ours, exact = rebuilt(z.float(), 8), rebuilt(z, 8)
    rest_mass = torch.logsumexp(exact[:, 8:], -1) - torch.logsumexp(exact, -1)
    assert float(rest_mass.exp().median()) < 1e-5  # the case that cancelled
    # float32's rounding of logits near 20 is ~1e-6: the rebuilt logits agree to that
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-5)
    student = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert reverse_kl(student, ours) == pytest.approx(reverse_kl(student, exact), rel=0.01)


def test_top_k_keeps_the_top_probabilities_exactly_at_T_1_and_not_at_T_2():
    z = peaked_logits(peak=3.0)
    top = F.softmax(z, -1).topk(8, -1)
    ours = F.softmax(rebuilt(z, 8), -1).gather(-1, top.indices)
    torch.testing.assert_close(ours, top.values, rtol=1e-12, atol=0)
    at_2 = F.softmax(rebuilt(z, 8) / 2, -1).gather(-1, top.indices)
    true_2 = F.softmax(z / 2, -1).gather(-1, top.indices)
    assert (at_2 / true_2 - 1).abs().max() > 0.01  # the flat tail moves them (documented)


# ------------------------------------------------------------------- the memory plan


def large_vocabulary(tmp_path, tokens: int = 13356):
    """A word-level tokenizer of ``tokens`` tokens, as a 13,356-word one over Tiny
    Shakespeare is, and a text of its words."""
    folder = tmp_path / "big-tokenizer"
    word_tokenizer(tokens).save_pretrained(folder)
    text = tmp_path / "words.txt"
    words = [f"filler{i}" for i in range(0, tokens - 100, 7)] * 2
    text.write_text(" ".join(words), encoding="utf-8")
    return folder, text


BIG = ["dataset=text_lm", "dataset.seq_len=16", "teacher=hf_lm", "teacher.width=16",
       "teacher.heads=2", "student=hf_lm", "student.width=8", "student.heads=2",
       "trainer.epochs=1", "trainer.batch_size=16", "trainer.eval_batch_size=16", "repeats=1",
       "progress=false",
       "num_threads=1", "latency.repeats_b1=4", "latency.repeats_b256=4", "latency.warmup=0"]


def test_a_cache_that_would_not_fit_switches_to_top_k_without_allocating_it(tmp_path,
                                                                           monkeypatch, caplog):
    from kdrun.run import memory_plan, pipeline
    from kdrun.train.targets import TeacherOnData

    tokenizer, text = large_vocabulary(tmp_path)
    # a small machine: the full cache (164 MB) is over half of it, a step (~0.23 GB) fits
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 300e6)
    full_logits = []
    monkeypatch.setattr(TeacherOnData, "logits", lambda *a, **k: full_logits.append(1))
    cfg = make_config(*BIG, f"dataset.files={text}", f"dataset.tokenizer={tokenizer}",
                      f"cache.dir={tmp_path}/cache")
    with caplog.at_level(logging.INFO, logger="kdrun"):
        result = pipeline.run(cfg, tmp_path / "run")
    said = re.search(r"every logit would take ([\d.]+) GB \(([\d,]+) rows x 13,356 classes\)",
                     caplog.text)
    rows = int(said[2].replace(",", ""))  # every position of every training window
    assert rows == 16 * int(re.search(r"data: text_lm, (\d+) train", caplog.text)[1])
    full = rows * 13356 * 4  # float32 logits
    assert float(said[1]) == pytest.approx(full / 1e9, abs=0.005)
    assert "caching the teacher's top-64 logits per row instead" in caplog.text
    assert not full_logits and list((tmp_path / "cache").glob("*/logits-top64-best_val.pt"))
    distilled = result["rows"][2]
    assert distilled["memory_free_mb"] == 300.0 and distilled["memory_plan_mb"] > 0
    forced = make_config(*BIG, f"dataset.files={text}", f"dataset.tokenizer={tokenizer}",
                         "trainer.teacher_cache=full", f"cache.dir={tmp_path}/cache2")
    with pytest.raises(ConfigError, match=rf"trainer.teacher_cache='full' is invalid: the "
                                          rf"teacher's logits on the training set would take "
                                          rf"{said[1]} GB \({said[2]} rows x 13,356 classes\), "
                                          r"over "
                                          r"trainer.memory_share=0.5 of the .* free beside the "
                                          r"rest of the run"):
        pipeline.run(forced, tmp_path / "run2")
    assert not (tmp_path / "cache2").exists()  # refused before the teacher trained


def test_a_batch_that_cannot_fit_names_its_knobs(tmp_path, monkeypatch):
    from kdrun.run import memory_plan, pipeline

    tokenizer, text = large_vocabulary(tmp_path)
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: 300e6)
    big_batch = make_config(*BIG, f"dataset.files={text}", f"dataset.tokenizer={tokenizer}",
                            "trainer.teacher_topk=8", "trainer.batch_size=64",
                            f"cache.dir={tmp_path}/cache")
    # 64 windows x 16 positions x 13,356 tokens x 4 bytes x 8 copies: 0.44 GB of logits
    with pytest.raises(ConfigError, match=r"trainer.loss_chunk_rows=None is invalid: "
                                          r"distilling the student needs about .* GB \(.*"
                                          r"logits and loss 0.44 GB.*more than the 0.30 GB "
                                          r"free on cpu: set trainer.loss_chunk_rows"):
        pipeline.run(big_batch, tmp_path / "run")
    big_eval = make_config(*BIG, f"dataset.files={text}", f"dataset.tokenizer={tokenizer}",
                           "trainer.eval_batch_size=1000", f"cache.dir={tmp_path}/cache")
    with pytest.raises(ConfigError, match=r"trainer.eval_batch_size=1000 is invalid: computing "
                                          r"the teacher's targets .* lower "
                                          r"trainer.eval_batch_size"):
        pipeline.run(big_eval, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_activations_are_what_autograd_saves_counted_on_the_meta_device():
    from kdrun.run.memory_plan import activation_bytes

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.ReLU(),
                                    torch.nn.Linear(30, 5))
    # saved: the first linear's input, 8 x 10 (its weight's gradient needs it), and the
    # ReLU's output, 8 x 30, which ReLU's backward and the second linear both save (one
    # tensor, counted once); the weights are not activations
    assert activation_bytes(model, 8, (10,)) == (8 * 10 + 8 * 30) * 4


def test_the_data_on_a_gpu_counts_every_split_in_memory():
    from kdrun.data import load_data
    from kdrun.run.memory_plan import data_bytes

    cfg = make_config("dataset=text_lm", "dataset.sentences=50", "dataset.seq_len=16")
    data = load_data(cfg.dataset, cfg.split)
    windows = len(data.train) + len(data.val) + len(data.test)
    assert data_bytes(data) == windows * 16 * 8 * 2  # int64 inputs and targets


def test_an_allocation_that_fails_is_one_line(tmp_path, monkeypatch):
    from kdrun.run import pipeline, stage

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 11334435840 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(stage, "fit", exhausted)
    cfg = make_config(*BIG, "dataset.sentences=100", f"cache.dir={tmp_path}/cache")
    with pytest.raises(UserError, match=r"out of memory on cpu asking for 11.33 GB \(the plan "
                                        r"said about .* GB free\); .*lower trainer.batch_size"):
        pipeline.run(cfg, tmp_path / "run")


@pytest.mark.slow  # the grammar experiment in full (~30 s)
def test_the_plan_is_within_30_percent_of_the_measured_peak(tmp_path):
    # kdrun runs as the only child of a wrapper, whose RUSAGE_CHILDREN is then kdrun's own
    # peak (this process's would be the largest of every child the test session started)
    wrapper = ("import resource, subprocess, sys; "
               "code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    p = subprocess.run([sys.executable, "-c", wrapper, KDRUN, "experiment=lm_grammar",
                        "progress=false", f"cache.dir={tmp_path}/cache"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    peak = int(p.stdout.splitlines()[-1]) * 1024  # ru_maxrss is in kB on Linux
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    planned = pd.read_csv(run / "summary.csv").memory_plan_mb[0] * 1e6
    assert abs(planned - peak) <= 0.3 * peak, (planned, peak)


# ------------------------------------------------------------------- the objective


def test_the_first_line_states_the_objective_and_the_summary_keeps_it(tmp_path, caplog):
    from kdrun.run import pipeline

    cfg = make_config("progress=false", "repeats=1", "trainer.epochs=1", "num_threads=1",
                      "loss.T=2", "loss.alpha=0.25", f"cache.dir={tmp_path}/cache")
    with caplog.at_level(logging.INFO, logger="kdrun"):
        rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    first = caplog.records[0].getMessage()
    assert first == (
        "objective: distilled student = 0.25 * T^2 (=4) * KL(p_t || p_s) at T=2, summed over "
        "the 10 classes, mean over every example of a batch + 0.75 * CE(label, student) mean "
        "over the labelled examples of a batch (the transfer set's carry none); teacher and "
        "scratch student = CE(label, model) mean over every example of a batch (p_t, p_s: "
        "the teacher's and the student's softmax(logits / T))")
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert list(summary.objective) == [r["objective"] for r in rows]
    assert summary.objective[0] == "CE(label, model) mean over every example of a batch"
    assert summary.objective[2].startswith("0.25 * T^2 (=4) * KL(p_t || p_s) at T=2")


@pytest.mark.parametrize("loss,expected", [
    (["loss=jsd", "loss.beta=0.3", "loss.T=1", "loss.alpha=1"],
     "1 * T^2 (=1) * JSD(beta=0.3) = 0.3 * KL(p_t || m) + 0.7 * KL(p_s || m), "
     "m = 0.3 p_t + 0.7 p_s at T=1, summed over the 256 tokens, mean over every position "
     "of a batch"),
    (["loss=reverse_kl", "loss.T=2", "loss.alpha=0.5", "loss.t2_scale=false"],
     "0.5 * 1 (t2_scale off) * KL(p_s || p_t) at T=2, summed over the 256 tokens, mean "
     "over every position of a batch + 0.5 * CE(label, student) mean over every position "
     "of a batch"),
    (["loss=kd", "loss.alpha=0"], "CE(label, student) mean over every position of a batch"),
])
def test_each_objective_is_written_as_computed(loss, expected):
    from kdrun.data import load_data
    from kdrun.run.objective import objective

    cfg = make_config("dataset=text_lm", "dataset.sentences=50", "dataset.seq_len=16", *loss)
    assert objective(cfg, load_data(cfg.dataset, cfg.split)).distilled == expected
