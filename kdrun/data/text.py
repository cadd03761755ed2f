"""Text for language models: token sequences whose targets are the next tokens.

``text_lm`` reads UTF-8 text files (``files``: a file, or a folder of ``*.txt``), or, with
no files, generates text of known structure from a small probabilistic grammar, offline.
Text becomes bytes (a byte-level tokenizer: 256 tokens, no vocabulary file), the byte
stream is cut into windows of ``seq_len + 1`` tokens, and each window gives an input
(its first ``seq_len`` tokens) and its targets (its last ``seq_len``): every position is
a next-token prediction, a "token row" (kdrun/train/tokens.py). Windows are disjoint,
so there is no padding; the last ``test_fraction`` of the text is the test split, the
rest training text.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from kdrun.checks import number
from kdrun.data.base import DATASETS, FRACTION, SEED, RawData
from kdrun.data.metrics import PERPLEXITY
from kdrun.errors import DataError

BYTE_VOCAB = 256

# A toy English grammar: a sentence is a noun phrase, a verb phrase and a full stop;
# the choices' weights make some continuations far likelier than others, which is the
# "dark knowledge" a teacher's soft next-token distributions carry.
GRAMMAR = {
    "S": [(("NP", "VP", "."), 1.0)],
    "NP": [(("Det", "N"), 0.55), (("Det", "Adj", "N"), 0.35), (("Det", "N", "PP"), 0.10)],
    "VP": [(("V", "NP"), 0.6), (("V",), 0.2), (("V", "NP", "PP"), 0.2)],
    "PP": [(("P", "NP"), 1.0)],
    "Det": [(("the",), 0.5), (("a",), 0.3), (("every",), 0.1), (("some",), 0.1)],
    "N": [((w,), p) for w, p in (("cat", .2), ("dog", .2), ("bird", .15), ("child", .15),
                                 ("teacher", .1), ("student", .1), ("garden", .05),
                                 ("window", .05))],
    "Adj": [((w,), p) for w, p in (("small", .3), ("red", .25), ("happy", .2), ("quiet", .15),
                                   ("old", .1))],
    "V": [((w,), p) for w, p in (("sees", .3), ("likes", .25), ("chases", .2), ("finds", .15),
                                 ("knows", .1))],
    "P": [((w,), p) for w, p in (("near", .4), ("with", .35), ("under", .25))],
}


def grammar_text(sentences: int, seed: int) -> str:
    """``sentences`` sentences drawn from GRAMMAR with ``seed``, joined by spaces."""
    rng = random.Random(seed)

    def expand(symbol: str) -> list[str]:
        if symbol not in GRAMMAR:
            return [symbol]
        options, weights = zip(*GRAMMAR[symbol])
        (choice,) = rng.choices(options, weights)
        return [word for part in choice for word in expand(part)]

    return " ".join(" ".join(expand("S")).replace(" .", ".") for _ in range(sentences))


def read_text(files: str) -> str:
    """The UTF-8 text of a file, or of every ``*.txt`` file of a folder in name order."""
    path = Path(files).expanduser()
    paths = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not path.exists() or not paths:
        raise DataError(f"dataset.files={files}: no such file, or a folder without *.txt "
                        "files; give a UTF-8 text file or a folder of them, or null for "
                        "generated text")
    parts = []
    for p in paths:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"dataset.files: {p} is not UTF-8 text (byte {e.start}); "
                            "convert it, e.g. iconv -t UTF-8") from None
    return "\n".join(parts)


def windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (windows, seq_len): disjoint windows of seq_len + 1 tokens,
    the targets shifted by one."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"dataset.seq_len={seq_len}: the text has {len(tokens)} tokens, too "
                        "few for one window; give more text or a shorter seq_len")
    stream = tokens[: n * seq_len + 1]
    return stream[:-1].view(n, seq_len), stream[1:].view(n, seq_len)


@DATASETS.register("text_lm", rules={
    "seq_len": number(2, integer=True), "sentences": number(10, integer=True),
    "test_fraction": FRACTION, "seed": SEED})
def text_lm(files: str | None = None, seq_len: int = 64, sentences: int = 6000,
            test_fraction: float = 0.1, seed: int = 0) -> RawData:
    """Next-token prediction on ``files`` or on generated text (``sentences`` of GRAMMAR),
    byte-level, judged by perplexity."""
    text = grammar_text(sentences, seed) if files is None else read_text(files)
    if not text.strip():
        raise DataError(f"dataset.files={files}: the text is empty")
    tokens = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(len(tokens) * (1 - test_fraction))
    x_train, y_train = windows(tokens[:cut], seq_len)
    x_test, y_test = windows(tokens[cut:], seq_len)
    return RawData(x_train, y_train, x_test, y_test, BYTE_VOCAB, metric=PERPLEXITY)
