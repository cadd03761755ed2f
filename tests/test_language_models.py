"""Language models, token by token (issue 27): generated and file text as next-token
windows, perplexity, the token-level divergences against numpy, and a GPT-2 built from
its config distilled end to end through the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdrun.data.metrics import PERPLEXITY
from kdrun.data.text import BYTE_VOCAB, grammar_text, text_lm, windows
from kdrun.errors import DataError
from kdrun.losses import build_loss
from kdrun.train.tokens import token_rows
from tests.helpers import make_config

# ------------------------------------------------------------------------ data


def test_generated_text_is_the_grammars_and_fixed_by_its_seed():
    text = grammar_text(50, seed=3)
    assert text == grammar_text(50, seed=3) and text != grammar_text(50, seed=4)
    sentences = [s.split() for s in text.split(".") if s.strip()]
    assert len(sentences) == 50
    assert all(s[0] in {"the", "a", "every", "some"} for s in sentences)


def test_windows_predict_the_next_token():
    tokens = torch.arange(23)
    x, y = windows(tokens, 5)
    assert x.shape == y.shape == (4, 5)
    assert torch.equal(y, x + 1)  # every target is the token after its input
    assert torch.equal(x.flatten(), tokens[:20])
    with pytest.raises(DataError, match="seq_len=30"):
        windows(tokens, 30)


def test_text_files_are_read_as_bytes_and_bad_files_refused(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld. " * 40, encoding="utf-8")
    raw = text_lm(files=str(tmp_path), seq_len=8)
    assert raw.num_classes == BYTE_VOCAB and raw.metric is PERPLEXITY
    assert raw.x_train.dtype == torch.long and raw.x_train.max() < 256
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe latin-1 \xe9")
    with pytest.raises(DataError, match="b.txt is not UTF-8"):
        text_lm(files=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        text_lm(files=str(empty))
    with pytest.raises(DataError, match="no such file"):
        text_lm(files=str(tmp_path / "missing.txt"))


def test_text_from_a_tables_column_and_parquet_without_its_engine(tmp_path):
    lines = tmp_path / "corpus.jsonl"
    lines.write_text("".join(f'{{"body": "line {i} of text", "n": {i}}}\n' for i in range(60)))
    raw = text_lm(files=str(lines), text_column="body", seq_len=8)
    stream = torch.cat([raw.x_train.flatten(), raw.x_test.flatten()])
    assert bytes(stream[:16].tolist()).decode() == "line 0 of text\nl"  # rows joined by newlines
    table = tmp_path / "corpus.csv"
    table.write_text("text\n" + "\n".join(f"row {i}" for i in range(80)))
    assert text_lm(files=str(table), seq_len=8).num_classes == BYTE_VOCAB
    with pytest.raises(DataError, match="dataset.text_column=text: no such column in "
                                        "corpus.jsonl; its columns: body, n"):
        text_lm(files=str(lines))
    fake = tmp_path / "corpus.parquet"
    fake.write_bytes(b"PAR1 not really")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="reading Parquet needs pyarrow"):
            text_lm(files=str(fake))
    else:
        with pytest.raises(DataError, match="corpus.parquet: not a readable .parquet file"):
            text_lm(files=str(fake))


def test_a_hugging_face_dataset_is_read_offline_as_its_files_would_be(tmp_path):
    datasets = pytest.importorskip("datasets")
    from kdrun.data.text import text_cls

    body = [f"row {i} of the corpus" for i in range(80)]
    (tmp_path / "corpus.csv").write_text("body\n" + "\n".join(body))
    from_file = text_lm(files=str(tmp_path / "corpus.csv"), text_column="body", seq_len=8)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": body}),
                          "extra": datasets.Dataset.from_dict({"body": body[:5]})}
                         ).save_to_disk(str(saved))
    from_hf = text_lm(hf_dataset=str(saved), text_column="body", seq_len=8)
    assert torch.equal(from_hf.x_train, from_file.x_train)
    assert torch.equal(from_hf.x_test, from_file.x_test)
    shorter = text_lm(hf_dataset=str(saved), hf_split="extra", text_column="body", seq_len=8)
    assert len(shorter.x_train) < len(from_hf.x_train)
    with pytest.raises(DataError, match="dataset.hf_split=validation: no such split in .*; "
                                        "its splits: train, extra"):
        text_lm(hf_dataset=str(saved), hf_split="validation", text_column="body")
    with pytest.raises(DataError, match="dataset.text_column=text: no such column in .*; its "
                                        "columns: body"):
        text_lm(hf_dataset=str(saved))
    with pytest.raises(DataError, match="dataset.hf_dataset=no-such/corpus: not on this "
                                        "machine.*never downloads"):
        text_lm(hf_dataset="no-such/corpus")
    with pytest.raises(DataError, match="give one of them"):
        text_lm(hf_dataset=str(saved), files=str(tmp_path / "corpus.csv"))
    labelled = tmp_path / "labelled"
    datasets.Dataset.from_dict({"text": body, "label": [i % 3 for i in range(80)]}
                               ).save_to_disk(str(labelled))
    assert text_cls(hf_dataset=str(labelled), seq_len=16).num_classes == 3


def test_a_label_budget_on_text_is_one_line():
    from kdrun.data import load_data

    cfg = make_config("dataset=text_lm", "dataset.sentences=50", "split.labeled=100")
    with pytest.raises(DataError, match="split.labeled: dataset=text_lm is text"):
        load_data(cfg.dataset, cfg.split)


# ----------------------------------------------------------------------- metric


def test_perplexity_is_the_exponentiated_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(40, 7), torch.randint(0, 7, (40,))
    expected = np.exp(F.cross_entropy(logits.double(), targets).item())
    assert PERPLEXITY.compute(logits, targets) == pytest.approx(expected, rel=1e-12)
    assert PERPLEXITY.compute(torch.zeros(5, 256), torch.arange(5)) == pytest.approx(256)
    stacked = PERPLEXITY.score(torch.stack([logits, logits * 2]), targets)  # per member
    assert stacked[0].item() == pytest.approx(expected, rel=1e-12)
    assert PERPLEXITY.better(2.0, than=3.0) and not PERPLEXITY.higher_is_better


def test_token_rows_flatten_positions_and_keep_members():
    logits, targets = torch.randn(3, 4, 5, 6), torch.randint(0, 6, (4, 5))
    rows, flat = token_rows(logits, targets)
    assert rows.shape == (3, 20, 6) and torch.equal(flat, targets.flatten())
    assert torch.equal(rows[1, 7], logits[1, 1, 2])  # sequence 1, position 2
    same = torch.randn(4, 6)
    assert token_rows(same, torch.arange(4))[0] is same  # a classifier's, unchanged


# --------------------------------------------------------------- the divergences


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return (p * np.log(p / q)).sum(-1).mean()


def _setup():
    torch.manual_seed(1)
    s, t = torch.randn(12, 9, dtype=torch.float64), torch.randn(12, 9, dtype=torch.float64) * 2
    y = torch.randint(0, 9, (12,))
    ce = F.cross_entropy(s, y).item()
    return s, t, y, ce


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_each_divergence_equals_its_formula(T):
    s, t, y, ce = _setup()
    p_s, p_t = _softmax(s.numpy() / T), _softmax(t.numpy() / T)
    beta, skew = 0.3, 0.2
    m = beta * p_t + (1 - beta) * p_s
    expected = {
        "reverse_kl": _kl(p_s, p_t),
        "tv": 0.5 * np.abs(p_t - p_s).sum(-1).mean(),
        "skew_kl": _kl(p_t, skew * p_t + (1 - skew) * p_s),
        "skew_kl reverse": _kl(p_s, skew * p_s + (1 - skew) * p_t),
        "jsd": beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m),
        "jsd 0": _kl(p_t, p_s),  # TRL's convention: beta 0 is the forward KL
        "jsd 1": _kl(p_s, p_t),  # and beta 1 the reverse KL
    }
    overrides = {"reverse_kl": [], "tv": [], "skew_kl": [f"loss.skew={skew}"],
                 "skew_kl reverse": [f"loss.skew={skew}", "loss.reverse=true"],
                 "jsd": [f"loss.beta={beta}"], "jsd 0": ["loss.beta=0"], "jsd 1": ["loss.beta=1"]}
    for case, term in expected.items():
        name = case.split()[0]
        loss = build_loss(make_config(f"loss={name}", f"loss.T={T}", "loss.alpha=0.25",
                                      *overrides[case]).loss)
        assert loss(s, t, y).item() == pytest.approx(0.25 * T**2 * term + 0.75 * ce,
                                                    rel=1e-9), case


def test_divergence_term_weights_and_the_forward_kl_end_of_jsd_is_kd():
    s, t, y, ce = _setup()
    jsd = build_loss(make_config("loss=jsd", "loss.beta=0", "loss.T=2", "loss.alpha=null",
                                 "loss.ce_weight=0.1", "loss.kd_weight=9").loss)
    kd = build_loss(make_config("loss=kd", "loss.T=2", "loss.alpha=null", "loss.ce_weight=0.1",
                                "loss.kd_weight=9").loss)
    assert jsd(s, t, y).item() == pytest.approx(kd(s, t, y).item(), rel=1e-12)


# --------------------------------------------------------------- end to end

TINY_LM = ["dataset=text_lm", "dataset.sentences=300", "dataset.seq_len=16",
           "teacher=hf_lm", "teacher.width=16", "teacher.heads=2", "student=hf_lm",
           "student.width=8", "student.heads=2", "trainer.epochs=2", "trainer.batch_size=16",
           "repeats=2", "progress=false", "latency.repeats_b1=4", "latency.repeats_b256=4",
           "latency.warmup=0"]


@pytest.mark.parametrize("family,loss", [
    ("gpt2", "kd"), pytest.param("llama", "jsd", marks=pytest.mark.slow)])  # (make test < 5 min)
def test_a_config_built_language_model_distils_end_to_end(tmp_path, family, loss):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline

    cfg = make_config(*TINY_LM, f"teacher.family={family}", f"student.family={family}",
                      f"loss={loss}", f"cache.dir={tmp_path}/cache")
    result = pipeline.run(cfg, tmp_path / "run")
    rows = result["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled", "scratch",
                                         "distilled"]
    assert all(r["metric"] == "perplexity" and r["higher_is_better"] is False for r in rows)
    assert all(1 < r["test_metric_best_val"] < 2 * BYTE_VOCAB for r in rows)
    tokens = rows[0]["train_tokens"]  # every position of every training window, per epoch
    assert tokens == rows[0]["train_labeled"] * 16  # dataset.seq_len
    for r in rows:
        assert r["train_tokens_per_s"] == pytest.approx(
            tokens * r["epochs"] / r["train_seconds"], rel=0.01)
    assert "training tokens per second (median over seeds): teacher " in result["table"]
    # the stage cache reuses every stage of a rerun
    again = pipeline.run(cfg, tmp_path / "run2")["rows"]
    assert all(r["reused"] for r in again)


def test_text_with_a_model_that_cannot_read_tokens_is_one_line(tmp_path):
    from kdrun.errors import ConfigError
    from kdrun.run import pipeline

    keep = [o for o in TINY_LM if not o.startswith("student")]
    cfg = make_config(*keep, "student=mlp", f"cache.dir={tmp_path}/cache")
    with pytest.raises(ConfigError, match="student.arch='mlp'.*only a language model"):
        pipeline.run(cfg, tmp_path / "run")


# ------------------------------------------------------- pretrained, offline only


def test_a_pretrained_name_not_on_this_machine_is_refused_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from kdrun.errors import UserError
    from kdrun.run.validate import validate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config(*TINY_LM, "teacher.name=gpt2-not-here/nowhere")
    with pytest.raises(UserError, match=r"teacher.name=gpt2-not-here/nowhere: not a local "
                                        r"folder, and not in the Hugging Face cache.*never "
                                        r"downloads"):
        validate(cfg)


def test_a_pretrained_folder_starts_the_teacher_and_its_weights_key_the_stage(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kdrun.models import model_identity
    from kdrun.run import pipeline

    folder = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=BYTE_VOCAB, n_positions=32, n_embd=16,
                                     n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    cfg = make_config(*TINY_LM, f"teacher.name={folder}", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert rows[0]["arch"] == str(folder) and rows[0]["params"] == sum(
        p.numel() for p in transformers.GPT2LMHeadModel(config).parameters())
    before = model_identity(cfg.teacher)["weights_sha256"]
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)  # other weights, same name
    assert model_identity(cfg.teacher)["weights_sha256"] != before
    wrong = tmp_path / "narrow-vocab"  # fewer output rows than the bytes: refused
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=200, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(wrong)
    with pytest.raises(DataError, match="its output has 200 rows, fewer than the 256 tokens"):
        pipeline.run(make_config(*TINY_LM, f"teacher.name={wrong}",
                                 f"cache.dir={tmp_path}/cache2"), tmp_path / "run2")


# ------------------------------------------------------------ text classification


def test_generated_sentences_are_labelled_by_their_subject():
    from kdrun.data.text import grammar_sentences

    texts, labels = grammar_sentences(200, seed=0)
    assert len(texts) == len(labels) == 200
    for text, label in zip(texts, labels):
        subject = next(w for w in text.split() if w.strip(".") in
                       {"cat", "dog", "bird", "child", "teacher", "student", "garden", "window"})
        group = {"cat": 0, "dog": 0, "bird": 0, "child": 1, "teacher": 1, "student": 1}
        assert label == group.get(subject.strip("."), 2)
    assert set(labels) == {0, 1, 2}


def test_labelled_files_and_their_one_line_errors(tmp_path):
    from kdrun.data.text import CLS, PAD, text_cls

    table = tmp_path / "reviews.csv"
    table.write_text("review,stars\n" + "\n".join(f"good {i},5\nbad {i},1" for i in range(20)))
    raw = text_cls(files=str(table), text_column="review", label_column="stars", seq_len=12)
    assert raw.num_classes == 2 and len(raw.y_train) + len(raw.y_test) == 40
    row = raw.x_train[0]
    assert row[0] == CLS and row[-1] == PAD  # the class token, then bytes, then padding
    with pytest.raises(DataError, match="dataset.label_column=label: no such column in "
                                        "reviews.csv; its columns: review, stars"):
        text_cls(files=str(table), text_column="review")
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n' * 5)
    assert text_cls(files=str(lines), seq_len=8).num_classes == 2


def test_a_config_built_text_classifier_distils_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline

    cfg = make_config("dataset=text_cls", "dataset.sentences=200", "dataset.seq_len=24",
                      "teacher=hf_cls", "teacher.width=16", "teacher.heads=2", "student=hf_cls",
                      "student.width=8", "student.heads=2", "trainer.epochs=2", "repeats=1",
                      "progress=false", "latency.repeats_b1=4", "latency.repeats_b256=4",
                      "latency.warmup=0", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(r["metric"] == "accuracy" and 0 <= r["test_metric_best_val"] <= 100 for r in rows)


# ------------------------------------------------------------ hidden-state cosine


def test_hidden_cosine_equals_its_formula_on_token_rows():
    """DistilBERT's cosine term on (batch, positions, width) features made rows: the mean
    over every position of 1 - cos(P h_s, h_t), P the learned map between widths."""
    from kdrun.losses.feature import HiddenCosine
    from kdrun.train.tokens import feature_rows

    torch.manual_seed(4)
    s_logits = torch.randn(2, 3, 7, dtype=torch.float64)
    t_logits = torch.randn(2, 3, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3))
    h_s, h_t = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    loss = HiddenCosine(beta=2.0, alpha=0.0)
    loss.prepare((4,), (6,))  # a row's shapes (kdrun/train/tokens.py: row_shapes)
    loss.double()
    rows, labels = token_rows(s_logits, y)
    ours = loss(rows, token_rows(t_logits, y)[0], labels, feature_rows(h_s, y),
                feature_rows(h_t, y)).item()
    w = loss.project.weight.detach().numpy()
    ps, pt = h_s.numpy().reshape(6, 4) @ w.T, h_t.numpy().reshape(6, 6)
    cos = (ps * pt).sum(1) / np.linalg.norm(ps, axis=1) / np.linalg.norm(pt, axis=1)
    ce = F.cross_entropy(rows, labels).item()
    assert ours == pytest.approx(ce + 2.0 * (1 - cos).mean(), rel=1e-9)
    same = HiddenCosine()
    same.prepare((6,), (6,))
    assert isinstance(same.project, torch.nn.Identity)  # equal widths: no map, as DistilBERT


def test_hidden_cosine_distils_a_language_model_from_cached_hidden_states(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline

    cfg = make_config(*TINY_LM, "loss=hidden_cosine", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert rows[2]["method"] == "hidden_cosine" and rows[2]["test_metric_best_val"] > 1
    assert list((tmp_path / "cache").glob("*/features-penultimate-best_val.pt"))


@pytest.mark.slow  # three kdrun processes, transformers imported in each
def test_a_killed_language_model_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    """kill -9 after the distilled LM's first epoch (tests/test_faults.py's killer), then
    the same command: the run finishes with the weights of a run never killed."""
    import os
    import subprocess

    from kdrun.store.files import load_checkpoint
    from tests.helpers import KDRUN
    from tests.test_faults import KILLER

    pytest.importorskip("transformers")
    (tmp_path / "killer").mkdir()
    (tmp_path / "killer" / "sitecustomize.py").write_text(KILLER)
    args = [a for a in TINY_LM if not a.startswith(("repeats", "trainer.epochs"))]
    args += ["repeats=1", "trainer.epochs=3", "num_threads=1", "hydra.run.dir=run"]

    def kdrun(folder: Path, kill_at: str | None = None):
        folder.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "KDRUN_KILL_AT"}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            filter(None, [str(tmp_path / "killer"), env.get("PYTHONPATH")])))
        if kill_at:
            env["KDRUN_KILL_AT"] = kill_at
        return subprocess.run([KDRUN, *args, f"cache.dir={folder}/cache"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)

    assert kdrun(tmp_path / "clean").returncode == 0
    killed = kdrun(tmp_path / "killed", "rows:distilled:1")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert kdrun(tmp_path / "killed").returncode == 0
    ours = load_checkpoint(tmp_path / "killed" / "run" / "checkpoints" / "distilled.pt")["model"]
    theirs = load_checkpoint(tmp_path / "clean" / "run" / "checkpoints" / "distilled.pt")["model"]
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


# ---------------------------------------------------------------- top-k teacher cache


def test_top_k_logits_keep_the_teachers_top_probabilities_and_spread_the_rest():
    from kdrun.data import Split
    from kdrun.train.targets import TopKLogits, predict_topk

    torch.manual_seed(5)
    teacher = torch.nn.Linear(6, 50).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    values, indices, rest = predict_topk(teacher, Split(x, torch.zeros(10, dtype=torch.long)),
                                         k=5, batch_size=4)
    assert values.shape == indices.shape == (10, 5) and indices.dtype == torch.int32
    rebuilt = TopKLogits(values, indices, rest, 50).dense(torch.arange(10))
    p_true, p_ours = F.softmax(teacher(x), -1), F.softmax(rebuilt, -1)
    top = p_true.topk(5, -1)
    torch.testing.assert_close(p_ours.gather(-1, top.indices), top.values, rtol=1e-12, atol=0)
    others = torch.ones_like(p_true, dtype=torch.bool).scatter_(-1, top.indices, False)
    tail = p_ours[others].view(10, 45)
    torch.testing.assert_close(tail, (1 - top.values.sum(-1, keepdim=True)).expand(10, 45) / 45,
                               rtol=1e-10, atol=0)  # the rest, evenly


@pytest.mark.slow  # two runs
def test_top_k_caching_distils_a_language_model_and_keys_only_the_distilled_stage(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline

    full = pipeline.run(make_config(*TINY_LM, f"cache.dir={tmp_path}/cache"),
                        tmp_path / "full")["rows"]
    topk = pipeline.run(make_config(*TINY_LM, "trainer.teacher_topk=4",
                                    f"cache.dir={tmp_path}/cache"), tmp_path / "topk")["rows"]
    keys = lambda rows: {(r["role"], r["seed"]): r["cache_key"] for r in rows}  # noqa: E731
    same = {k for k in keys(full) if keys(full)[k] == keys(topk)[k]}
    assert same == {("teacher", 0), ("scratch", 0), ("scratch", 1)}  # reused, not retrained
    assert all(r["reused"] for r in topk if r["role"] != "distilled")
    assert list((tmp_path / "cache").glob("*/logits-top4-best_val.pt"))


# ------------------------------------------------------------ sequence-level KD


def test_sequence_kd_continues_training_prompts_the_same_way_every_time():
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kdrun.data import Split
    from kdrun.data.labels import UNLABELED
    from kdrun.models import build_model
    from kdrun.run.schemes.sequence import SequenceKD

    raw = text_lm(sentences=100, seq_len=12)
    torch.manual_seed(0)
    teacher = build_model(OmegaConf.create({"arch": "hf_lm", "layers": 1, "width": 16,
                                            "heads": 2}), (12,), BYTE_VOCAB)
    scheme = SequenceKD(samples=7, prompt=4, temperature=1.0)
    train = Split(raw.x_train, raw.y_train)
    data = SimpleNamespace(train=train, end_token=None)  # plain text: no instructions
    written = scheme.write(teacher, data, torch.device("cpu"), seed=3)
    assert written.x.shape == (7, 12) and written.x.dtype == torch.long
    assert (written.y == UNLABELED).all()  # the teacher's text carries no label
    assert torch.equal(written.x, scheme.write(teacher, data, torch.device("cpu"), seed=3).x)
    written = written.x
    prefixes = {tuple(row[:4].tolist()) for row in raw.x_train}
    assert all(tuple(row[:4].tolist()) in prefixes for row in written)  # training prompts


@pytest.mark.slow  # three runs
def test_sequence_kd_distils_on_the_teachers_text_and_refuses_other_data(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.errors import ConfigError
    from kdrun.run import pipeline

    cfg = make_config(*TINY_LM, "scheme=sequence_kd", "scheme.samples=20", "scheme.prompt=4",
                      f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    distilled = [r for r in rows if r["role"] == "distilled"]
    scratch = [r for r in rows if r["role"] == "scratch"]
    assert all(r["train_unlabeled"] == 20 for r in distilled)  # the windows it wrote
    assert all(r["train_unlabeled"] == 0 for r in scratch)
    again = pipeline.run(cfg, tmp_path / "run2")["rows"]  # the same text: every stage reused
    assert all(r["reused"] for r in again)
    with pytest.raises(ConfigError, match="scheme.name='sequence_kd'.*language model"):
        pipeline.run(make_config("dataset=synthetic", "dataset.n=200", "teacher=mlp",
                                 "repeats=1", "trainer.epochs=1", "progress=false",
                                 "scheme=sequence_kd", f"cache.dir={tmp_path}/c2"),
                     tmp_path / "run3")


# ------------------------------------------------------------ on-policy (GKD)


def tiny_lm_model(width: int, seed: int, positions: int = 12):
    from omegaconf import OmegaConf

    from kdrun.models import build_model

    torch.manual_seed(seed)
    return build_model(OmegaConf.create({"arch": "hf_lm", "layers": 1, "width": width,
                                         "heads": 2}), (positions,), BYTE_VOCAB)


def test_on_policy_batches_are_the_students_own_text_without_labels():
    pytest.importorskip("transformers")
    from contextlib import nullcontext

    from kdrun.data.labels import UNLABELED
    from kdrun.train.on_policy import OnPolicyTeacher

    raw = text_lm(sentences=60, seq_len=12)
    x, y = raw.x_train[:5], raw.y_train[:5]
    student = tiny_lm_model(8, seed=1)
    always = OnPolicyTeacher(tiny_lm_model(16, seed=0), nullcontext, 1.0, 4, 1.0)
    text, labels = always.rewrite(student, x, y, torch.Generator().manual_seed(7))
    assert text.shape == x.shape and torch.equal(text[:, :4], x[:, :4])  # its prompts
    assert not torch.equal(text, x) and (labels == UNLABELED).all()
    again, _ = always.rewrite(student, x, y, torch.Generator().manual_seed(7))
    assert torch.equal(text, again)  # the stage's generator decides: a resume writes the same
    never = OnPolicyTeacher(always.model, nullcontext, 0.0, 4, 1.0)
    assert never.rewrite(student, x, y, torch.Generator()) == (x, y)
    assert always.stage_key == {"on_policy": {"fraction": 1.0, "prompt": 4, "temperature": 1.0}}


@pytest.mark.slow  # four runs in float64
def test_on_policy_at_fraction_0_is_offline_kd_to_rounding_and_its_keys_hold_it(tmp_path):
    """Fraction 0 never rewrites a batch: the live teacher's logits on each batch are the
    cached ones in another order, so the distilled weights agree with offline KD's within
    the float64 bound (tests/helpers.py); a fraction of 0.5 is another stage."""
    pytest.importorskip("transformers")
    from kdrun.run import pipeline
    from kdrun.store.files import load_checkpoint
    from tests.helpers import assert_float64_weights_agree

    common = [*TINY_LM, "repeats=1", "trainer.float64=true", f"cache.dir={tmp_path}/cache"]
    runs = {name: pipeline.run(make_config(*common, *extra), tmp_path / name)["rows"]
            for name, extra in {"offline": [], "zero": ["scheme=on_policy", "scheme.fraction=0"],
                                "half": ["scheme=on_policy", "scheme.prompt=4"]}.items()}
    weights = {name: load_checkpoint(tmp_path / name / "checkpoints" / "distilled.pt")["model"]
               for name in runs}
    assert_float64_weights_agree(weights["zero"], weights["offline"], "fraction 0 vs offline")
    keys = {name: next(r["cache_key"] for r in rows if r["role"] == "distilled")
            for name, rows in runs.items()}
    assert len(set(keys.values())) == 3  # the targets' kind and the fraction are keyed
    assert all(r["reused"] for r in runs["zero"] if r["role"] in ("teacher", "scratch"))
    difference = max(float((weights["half"][k] - weights["offline"][k]).abs().max())
                     for k in weights["offline"])
    assert difference > 1e-3  # the student's own text changed what it learned


def test_on_policy_refuses_data_that_is_not_text(tmp_path):
    from kdrun.errors import ConfigError
    from kdrun.run import pipeline

    with pytest.raises(ConfigError, match="scheme.name='on_policy'.*language model"):
        pipeline.run(make_config("dataset=synthetic", "dataset.n=200", "teacher=mlp",
                                 "repeats=1", "trainer.epochs=1", "progress=false",
                                 "scheme=on_policy", f"cache.dir={tmp_path}/c"), tmp_path / "r")


def test_a_bpe_learned_from_the_training_text_tokenizes_offline_and_decodes_exactly():
    pytest.importorskip("tokenizers")
    from kdrun.data.text import check_tokenizer, learned_bpe, tokenize

    text = grammar_text(400, seed=0) + " zebra zebra zebra zebra"  # test text: a new word
    train_chars = len(text) - len(" zebra zebra zebra zebra")
    ids, vocab = tokenize(text, "bpe:300", train_chars)
    assert vocab == 300 and int(ids.max()) < 300
    again, _ = tokenize(text, "bpe:300", train_chars)
    assert torch.equal(ids, again)  # the same text, the same tokenizer
    bpe = learned_bpe(text[:train_chars], 300)
    assert bpe.decode(ids.tolist()) == text  # every token decodes to exact bytes
    assert len(ids) < len(text.encode()) / 2  # merges learned: under half the bytes
    assert "Ġzebra" not in bpe.get_vocab()  # the test text shaped no token
    assert "Ġteacher" in bpe.get_vocab()
    assert check_tokenizer("bpe:100") and check_tokenizer("bpe:x") and not check_tokenizer(
        "bpe:512")


@pytest.mark.slow  # one language-model run (~4 s)
def test_text_tokenized_by_a_learned_bpe_trains_a_language_model(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline

    cfg = make_config(*TINY_LM, "dataset.tokenizer=bpe:300", "repeats=1",
                      f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(1 < r["test_metric_best_val"] < 300 for r in rows)  # perplexity of 300 tokens


def test_a_byte_teachers_view_aligns_with_each_bpe_position_on_the_text():
    pytest.importorskip("tokenizers")
    from kdrun.data.text import ByteView, learned_bpe, windows

    text = grammar_text(300, seed=1)
    bpe = learned_bpe(text, 320)
    tokens = torch.tensor(bpe.encode(text).ids)
    x, y = windows(tokens, 12)
    view = ByteView.of(bpe)
    view.positions = max(view.span(row) for row in x.tolist())
    texts, aligned = view(x[:20])
    for i in range(20):
        window = bpe.decode(x[i].tolist()).encode()
        assert bytes(texts[i, :len(window)].tolist()) == window  # the window's own text
        for j in range(12):  # after the aligned byte comes the student's next token
            following = bpe.decode([int(y[i, j])]).encode()
            span = bpe.decode(x[i, :j + 1].tolist()).encode()
            assert int(aligned[i, j]) == len(span) - 1
            assert window[:int(aligned[i, j]) + 1] + following == \
                bpe.decode(x[i, :j + 1].tolist() + [int(y[i, j])]).encode()


@pytest.mark.parametrize("overrides, words", [
    (["loss=kd"], "loss.name='kd' is invalid: compares the teacher's and the student's "
                  "distributions token by token, one vocabulary; with "
                  "dataset.teacher_tokenizer: uld"),
    (["scheme=sequence_kd"], "scheme.name='sequence_kd' is invalid: does not align"),
    (["dataset.tokenizer=bytes", "dataset.teacher_tokenizer=bpe:300"],
     "dataset.teacher_tokenizer='bpe:300' is invalid: must be null"),
    (["trainer.teacher_topk=8"], "needs the teacher's every logit, cached"),
])
def test_a_teacher_with_its_own_tokenizer_refuses_what_cannot_align(overrides, words):
    from kdrun.errors import UserError
    from kdrun.run.validate import validate

    with pytest.raises(UserError) as error:
        cfg = make_config("experiment=lm_cross_tokenizer", *overrides)
        validate(cfg)
        from kdrun.data import load_data

        load_data(cfg.dataset, cfg.split)
    assert words in str(error.value)


@pytest.mark.slow  # one cross-tokenizer run (~10 s)
def test_a_byte_teacher_distils_a_bpe_student_through_aligned_logits(tmp_path):
    pytest.importorskip("transformers")
    from kdrun.run import pipeline
    from kdrun.store.files import load_checkpoint, load_sealed

    cfg = make_config("experiment=lm_cross_tokenizer", "dataset.sentences=300",
                      "trainer.teacher_epochs=2", "trainer.student_epochs=1", "repeats=1",
                      "progress=false", "latency.repeats_b1=4", "latency.repeats_b256=4",
                      "latency.warmup=0", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    teacher = load_checkpoint(tmp_path / "run" / "checkpoints" / "teacher.pt")["model"]
    student = load_checkpoint(tmp_path / "run" / "checkpoints" / "scratch.pt")["model"]
    assert teacher["lm.lm_head.weight"].shape[0] == 256  # the teacher reads bytes
    assert student["lm.lm_head.weight"].shape[0] > 256  # the student, its BPE
    (aligned,) = (tmp_path / "cache").glob("*/logits-aligned-best_val.pt")
    logits = load_sealed(aligned)
    assert logits.shape[1:] == (32, 256)  # every student window, position, byte


def test_a_byte_teachers_training_text_ends_where_the_students_does():
    pytest.importorskip("tokenizers")
    from kdrun.data.text import text_lm

    raw = text_lm(sentences=400, seq_len=16, tokenizer="bpe:320", teacher_tokenizer="bytes")
    view = raw.teacher_view
    student_bytes = view.span(raw.x_train.flatten().tolist()) + len(
        view.token_bytes[int(raw.y_train[-1, -1])])  # through the last window's target
    teacher_bytes = raw.teacher.x_train.numel() + 1  # its windows and their last target
    assert teacher_bytes <= student_bytes + raw.teacher.x_train.shape[1]  # none beyond
    assert raw.teacher.x_train.shape[1] == view.positions >= view.span(
        raw.x_test[0].tolist())
