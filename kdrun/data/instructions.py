"""Instruction data for language models: prompt/response pairs, each one window in which
only the response is learned.

A pair is read from a table (``files``: CSV, JSON lines, Parquet; or ``hf_dataset``): a
prompt and a response column, or a column of chat messages (``messages_column``, the last
assistant message the response). The prompt is written as the tokenizer's chat template
writes it where it has one (``chat_template: auto``), else by ``template``; the response
follows, closed by the tokenizer's end-of-sequence token (bytes: ``end_text``). With no
files, pairs are generated offline: questions about sentences of the grammar of
kdrun/data/text.py, answered by a word of the sentence.

Padding, not packing: each pair is its own window of ``seq_len`` tokens, right-padded, so
that no example attends to another's tokens (a causal model never reads the padding after
a response either); pairs longer than a window are left out and counted in the log. The
targets of the prompt's positions and of the padding are NO_LOSS: no loss, meter or
metric reads them (kdrun/train/tokens.py), so the perplexity is the responses' own.
"""

from __future__ import annotations

import logging
import random

import torch

from kdrun.checks import number
from kdrun.data.base import DATASETS, FRACTION, SEED
from kdrun.data.labels import NO_LOSS
from kdrun.data.metrics import PERPLEXITY
from kdrun.data.raw import RawData
from kdrun.data.text import (
    BYTE_VOCAB,
    GRAMMAR,
    grammar_sentences,
    local_tokenizer,
    read_rows,
)
from kdrun.errors import DataError

log = logging.getLogger("kdrun")

QUESTIONS = ("subject", "verb", "object")  # what the generated questions ask for


def generated_pairs(examples: int, seed: int) -> list[tuple[str, str]]:
    """``examples`` (prompt, response) pairs: a sentence of the grammar and a question
    about it ("subject?", "verb?", "object?"), answered by the word asked for (the noun of
    its first noun phrase, its verb, the noun after the verb, or "none")."""
    rng = random.Random(seed)
    sentences, _ = grammar_sentences(examples, seed)
    pairs = []
    for sentence in sentences:
        question = rng.choice(QUESTIONS)
        pairs.append((f"{sentence} {question}?", answer(sentence, question)))
    return pairs


def answer(sentence: str, question: str) -> str:
    """The word of a grammar sentence a question asks for."""
    nouns, verbs, prepositions = ({w for (w,), _ in GRAMMAR[part]} for part in "NVP")
    words = sentence.rstrip(".").split()
    verb_at = next(i for i, w in enumerate(words) if w in verbs)
    if question == "subject":
        return next(w for w in words if w in nouns)
    if question == "verb":
        return words[verb_at]
    after = [w for w in words[verb_at + 1:] if w in nouns]
    object_np = after and words[verb_at + 1] not in prepositions
    return after[0] if object_np else "none"


class PairEncoder:
    """Token ids of a pair's prompt and of its response (ending with the end token)."""

    def __init__(self, tokenizer: str, template: str, end_text: str, chat_template: str):
        self.template, self.end_text = template, end_text
        self.tok = None
        if tokenizer == "bytes":
            self.vocab, self.end_token = BYTE_VOCAB, end_text.encode("utf-8")[-1]
            self.pad = 0
            return
        self.tok = local_tokenizer(tokenizer)
        if self.tok.eos_token_id is None:
            raise DataError(f"dataset.tokenizer={tokenizer}: it has no end-of-sequence token "
                            f"to end a response with")
        self.vocab, self.end_token = len(self.tok), self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.end_token
        self.chat = chat_template == "auto" and bool(getattr(self.tok, "chat_template", None))

    @property
    def format(self) -> str:
        """How prompts are written, for the log."""
        if self.tok is not None and self.chat:
            return "the tokenizer's chat template"
        return f"template {self.template!r}"

    def encode(self, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
        if self.tok is None:
            prompt = self.template.format(prompt=messages[-1]["content"])
            return list(prompt.encode("utf-8")), list((response + self.end_text).encode("utf-8"))
        if self.chat:
            prompt_text = self.tok.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True)
            prompt = self.tok(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            prompt = self.tok(self.template.format(prompt=messages[-1]["content"]))["input_ids"]
        reply = self.tok(response, add_special_tokens=False)["input_ids"]
        return prompt, [*reply, self.end_token]


def window(prompt: list[int], response: list[int], seq_len: int, pad: int):
    """(input, targets) of one pair in a window of ``seq_len`` positions, right-padded:
    the targets of the prompt's positions and of the padding are NO_LOSS."""
    ids = prompt + response
    x = torch.full((seq_len,), pad, dtype=torch.long)
    y = torch.full((seq_len,), NO_LOSS, dtype=torch.long)
    x[: len(ids) - 1] = torch.tensor(ids[:-1])
    y[len(prompt) - 1: len(ids) - 1] = torch.tensor(response)
    return x, y


def read_pairs(files, hf_dataset, hf_split, prompt_column, response_column,
               messages_column) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) of every row of a table."""
    columns = {"messages_column": messages_column} if messages_column else {
        "prompt_column": prompt_column, "response_column": response_column}
    table = read_rows(files, hf_dataset, hf_split, columns)
    if table is None:
        raise DataError(f"dataset.files={files}: instruction data is a table (.csv, .jsonl, "
                        ".parquet) or a Hugging Face dataset (dataset.hf_dataset)")
    if not messages_column:
        return [([{"role": "user", "content": str(p)}], str(r))
                for p, r in zip(table[prompt_column], table[response_column])]
    pairs = []
    for i, messages in enumerate(table[messages_column]):
        messages = [dict(m) for m in messages]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"dataset.messages_column={messages_column}: row {i} does not "
                            f"end with an assistant message (the response to learn)")
        pairs.append((messages[:-1], str(messages[-1]["content"])))
    return pairs


@DATASETS.register("instructions", rules={
    "seq_len": number(4, integer=True), "examples": number(10, integer=True),
    "test_fraction": FRACTION, "seed": SEED,
    "chat_template": lambda v: None if v in ("auto", False) else "must be auto or false",
    "tokenizer": lambda v: "must be bytes or a Hugging Face tokenizer's name or folder (bpe:N "
    "is learned for dataset=text_lm)" if not isinstance(v, str) or not v or
    v.startswith("bpe:") else None})
def instructions(files: str | None = None, hf_dataset: str | None = None,
                 hf_split: str = "train", prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: str | None = None,
                 template: str = "{prompt}\n", end_text: str = "\n",
                 chat_template: str | bool = "auto", seq_len: int = 64, examples: int = 4000,
                 test_fraction: float = 0.1, seed: int = 0,
                 tokenizer: str = "bytes") -> RawData:
    """Prompt/response pairs from a table or generated, one right-padded window each,
    learned on the responses' tokens only, judged by the responses' perplexity."""
    if files is None and hf_dataset is None:
        pairs = [([{"role": "user", "content": p}], r) for p, r in generated_pairs(examples,
                                                                                   seed)]
    else:
        pairs = read_pairs(files, hf_dataset, hf_split, prompt_column, response_column,
                           messages_column)
    encoder = PairEncoder(tokenizer, template, end_text, chat_template)
    encoded = [encoder.encode(messages, response) for messages, response in pairs]
    fits = [(p, r) for p, r in encoded if len(p) + len(r) - 1 <= seq_len and r]
    if not fits:
        raise DataError(f"dataset.seq_len={seq_len}: no prompt and response fits in a window "
                        f"(the shortest pair has {min(len(p) + len(r) for p, r in encoded)} "
                        f"tokens); raise seq_len")
    log.info("instructions: %d pairs, prompts written by %s, each its own window of %d "
             "tokens (padded; %d longer pairs left out); losses on the responses' tokens",
             len(fits), encoder.format, seq_len, len(encoded) - len(fits))
    x, y = map(torch.stack, zip(*(window(p, r, seq_len, encoder.pad) for p, r in fits)))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - max(1, round(len(x) * test_fraction))
    train, test = order[:cut], order[cut:]
    return RawData(x[train], y[train], x[test], y[test], encoder.vocab, metric=PERPLEXITY,
                   end_token=encoder.end_token)
