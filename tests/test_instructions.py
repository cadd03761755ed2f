"""Instruction data: prompt/response pairs, one window each, learned on the responses
only. No prompt or padding position reaches any loss, for the offline, sequence-level and
on-policy schemes: every batch a loss gets is checked against the windows it came from."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdrun.data import load_data
from kdrun.data.instructions import answer, generated_pairs, window
from kdrun.data.labels import NO_LOSS, UNLABELED
from kdrun.errors import DataError
from kdrun.train.generate import respond
from tests.helpers import make_config

pytest.importorskip("transformers")

TINY = ["dataset=instructions", "dataset.examples=120", "teacher=hf_lm", "student=hf_lm",
        "teacher.layers=1", "teacher.width=16", "student.layers=1", "student.width=8",
        "trainer.epochs=1", "trainer.batch_size=16", "repeats=1", "progress=false",
        "num_threads=1"]


def test_a_window_learns_the_response_only():
    x, y = window([5, 6, 7], [8, 9, 10], seq_len=8, pad=0)
    assert x.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]  # the last response token is only a target
    assert y.tolist() == [NO_LOSS, NO_LOSS, 8, 9, 10, NO_LOSS, NO_LOSS, NO_LOSS]


def test_the_generated_questions_are_answered_by_a_word_of_the_sentence():
    assert answer("the small cat sees a dog.", "subject") == "cat"
    assert answer("the small cat sees a dog.", "verb") == "sees"
    assert answer("the small cat sees a dog.", "object") == "dog"
    assert answer("every bird knows.", "object") == "none"
    assert answer("a child finds near the garden.", "object") == "none"  # a place, no object
    pairs = generated_pairs(50, seed=0)
    assert all(p.endswith(("subject?", "verb?", "object?")) for p, _ in pairs)


def test_pairs_from_a_table_and_from_chat_messages(tmp_path):
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) + "\n"
                             for i in range(30)))
    cfg = make_config("dataset=instructions", f"dataset.files={table}", "dataset.seq_len=16")
    data = load_data(cfg.dataset, cfg.split)
    x, y = data.train.x[0], data.train.y[0]
    text = bytes(x[y == NO_LOSS][:6].tolist()).decode()
    assert text.startswith("say ")  # the template "{prompt}\n": the prompt as written
    response = bytes(y[y != NO_LOSS].tolist()).decode()
    assert response.endswith("\n") and response[:-1].isdigit()  # the answer, then its end
    assert data.end_token == ord("\n")

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]})
        + "\n" for i in range(30)))
    cfg = make_config("dataset=instructions", f"dataset.files={chats}", "dataset.seq_len=16",
                      "dataset.messages_column=messages")
    assert load_data(cfg.dataset, cfg.split).train.x.shape[1] == 16

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = make_config("dataset=instructions", f"dataset.files={broken}",
                      "dataset.messages_column=messages")
    with pytest.raises(DataError, match="row 0 does not end with an assistant message"):
        load_data(cfg.dataset, cfg.split)


def test_pairs_longer_than_a_window_are_left_out_and_none_fitting_is_one_line():
    cfg = make_config("dataset=instructions", "dataset.examples=200", "dataset.seq_len=40")
    data = load_data(cfg.dataset, cfg.split)
    kept = len(data.train) + len(data.val) + len(data.test)
    assert 0 < kept < 200
    cfg = make_config("dataset=instructions", "dataset.examples=50", "dataset.seq_len=8")
    with pytest.raises(DataError, match=r"dataset.seq_len=8: no prompt and response fits"):
        load_data(cfg.dataset, cfg.split)


class AlwaysWrites(nn.Module):
    """A language model that writes ``token`` at every position."""

    outputs_per_token = True

    def __init__(self, token: int, vocab: int = 16):
        super().__init__()
        self.token, self.vocab = token, vocab
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.full((*x.shape, self.vocab), -30.0)
        logits[..., self.token] = 30.0
        return logits + self.weight


def test_a_written_answer_is_learned_through_its_end_and_never_its_prompt():
    x, y = window([1, 2, 3], [4, 5], seq_len=8, pad=0)  # a prompt of 3, then its answer
    x2, y2 = window([1, 2], [4], seq_len=8, pad=0)  # a shorter prompt
    end = 9
    written, labels = respond(AlwaysWrites(end), torch.stack([x, x2]), torch.stack([y, y2]),
                              end, 1.0, torch.Generator().manual_seed(0))
    assert written[0, :3].tolist() == [1, 2, 3] and written[1, :2].tolist() == [1, 2]
    assert written[0, 3] == end and written[1, 2] == end  # the answer, its end at once
    # the target at the prompt's last position is the written end: learned; the prompt's
    # other positions and everything after the end reach no loss
    assert labels[0].tolist() == [NO_LOSS, NO_LOSS, UNLABELED] + [NO_LOSS] * 5
    assert labels[1].tolist() == [NO_LOSS, UNLABELED] + [NO_LOSS] * 6

    _, labels = respond(AlwaysWrites(7), x[None], y[None], end, 1.0,
                        torch.Generator().manual_seed(0))  # never ends: to the window's end
    assert labels[0].tolist() == [NO_LOSS, NO_LOSS] + [UNLABELED] * 6


@pytest.mark.parametrize("scheme", [[], ["scheme=sequence_kd", "scheme.samples=40"],
                                    ["scheme=on_policy", "scheme.fraction=0.5"]],
                         ids=["offline", "sequence_kd", "on_policy"])
def test_no_prompt_or_padding_position_reaches_any_loss(tmp_path, monkeypatch, scheme):
    from kdrun.losses import CE, KD
    from kdrun.run import pipeline
    from kdrun.train.fit import SingleModel

    batches, calls = [], []
    loss_of = SingleModel.loss_of

    def recorded_loss_of(self, idx, xb, yb):
        batches.append((self.stage, yb.clone()))
        return loss_of(self, idx, xb, yb)
    monkeypatch.setattr(SingleModel, "loss_of", recorded_loss_of)
    for cls in (CE, KD):
        def recorded(self, student, teacher, labels, *rest, forward=cls.forward):
            calls.append((len(student), None if teacher is None else len(teacher),
                          labels.clone()))
            return forward(self, student, teacher, labels, *rest)
        monkeypatch.setattr(cls, "forward", recorded)

    pipeline.run(make_config(*TINY, *scheme, f"cache.dir={tmp_path}/cache"), tmp_path / "run")
    assert len(batches) == len(calls) > 0
    for (stage, yb), (rows, teacher_rows, labels) in zip(batches, calls):
        expected = yb[yb != NO_LOSS]
        assert rows == len(expected) and torch.equal(labels, expected), stage
        assert teacher_rows in (None, rows)
        assert not (labels == NO_LOSS).any()
    distilled = [yb for stage, yb in batches if stage == "distilled"]
    if scheme:  # the teacher's or the student's own answers were learned, on their rows only
        assert any((yb == UNLABELED).any() for yb in distilled)


def test_a_tokenizer_with_a_chat_template_writes_the_prompts(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from kdrun.data.text import learned_bpe

    bpe = learned_bpe("hello there, say one two three four five. " * 20, 300)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    tok.add_special_tokens({"eos_token": "</s>"})
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps({"prompt": f"say {w}", "response": w}) + "\n"
                             for w in ["one", "two", "three", "four", "five"] * 6))
    cfg = make_config("dataset=instructions", f"dataset.files={table}",
                      f"dataset.tokenizer={tmp_path / 'tok'}", "dataset.seq_len=40",
                      "split.val_fraction=0")
    data = load_data(cfg.dataset, cfg.split)
    x, y = data.train.x[0], data.train.y[0]
    first = int((y != NO_LOSS).float().argmax())  # the first response target
    prompt = tok.decode(x[: first + 1].tolist())  # the positions up to it: the prompt
    assert prompt.startswith("<user>say ") and prompt.endswith("<assistant>")
    answer_ids = y[y != NO_LOSS].tolist()
    assert answer_ids[-1] == tok.eos_token_id == data.end_token  # the response's end
    assert tok.decode(answer_ids[:-1]).strip() in {"one", "two", "three", "four", "five"}
