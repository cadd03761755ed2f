"""Pretrained language-model pairs as users bring them, built offline: a word-level
tokenizer (the ``tokenizers`` library) saved with ``save_pretrained``, and GPT-2 models
whose output rows pad that tokenizer by different amounts."""

from __future__ import annotations

from pathlib import Path

from kdrun.data.text import grammar_text

SPECIALS = ["[UNK]", "[PAD]", "<|endoftext|>"]


def grammar_words(sentences: int = 400, seed: int = 0) -> list[str]:
    """The grammar's words and its full stop, in order of first appearance."""
    text = grammar_text(sentences, seed).replace(".", " .")
    return list(dict.fromkeys(text.split()))


def word_tokenizer(size: int, rename: dict[int, str] | None = None):
    """A word-level fast tokenizer of ``size`` tokens: specials, the grammar's words, then
    filler words; ``rename`` gives some ids other strings (a tokenizer that differs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + grammar_words()
    words += [f"filler{i}" for i in range(size - len(words))]
    for i, word in (rename or {}).items():
        words[i] = word
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                   pad_token="[PAD]", eos_token="<|endoftext|>")


def pretrained_lm(folder: Path, rows: int, tokenizer=None, width: int = 16, seed: int = 0,
                  positions: int = 64) -> Path:
    """A GPT-2 with ``rows`` output rows saved into ``folder`` with save_pretrained, and
    ``tokenizer`` beside it when given."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=rows, n_positions=positions, n_embd=width,
                                     n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def padded_pair(root: Path, rename: dict[int, str] | None = None) -> tuple[Path, Path, Path]:
    """(teacher folder, student folder, text file): one 500-token tokenizer, a teacher of
    576 output rows and a student of 512, as Qwen2.5's 7B and 0.5B pad theirs;
    ``rename``: the student's tokenizer differs at those ids."""
    teacher = pretrained_lm(root / "teacher", 576, word_tokenizer(500), width=32)
    student = pretrained_lm(root / "student", 512, word_tokenizer(500, rename), width=16, seed=1)
    text = root / "text.txt"
    text.write_text(grammar_text(600, 1).replace(".", " ."), encoding="utf-8")
    return teacher, student, text
