"""Text for language models: token sequences whose targets are the next tokens.

``text_lm`` reads UTF-8 text files (``files``: a file, or a folder of ``*.txt``), or, with
no files, generates text of known structure from a small probabilistic grammar, offline.
Text becomes tokens: bytes by default (a byte-level tokenizer: 256 tokens, no vocabulary
file), or a Hugging Face tokenizer from a local folder or the HF cache (``tokenizer``, never
downloaded: a pretrained model's own, so that model and data share a vocabulary). The token
stream is cut into windows of ``seq_len + 1`` tokens, and each window gives an input
(its first ``seq_len`` tokens) and its targets (its last ``seq_len``): every position is
a next-token prediction, a "token row" (kdrun/train/tokens.py). Windows are disjoint,
so there is no padding; the last ``test_fraction`` of the text is the test split, the
rest training text.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import torch

from kdrun.checks import number
from kdrun.data.base import DATASETS, FRACTION, SEED
from kdrun.data.metrics import PERPLEXITY
from kdrun.data.raw import RawData, carve_test
from kdrun.errors import DataError
from kdrun.store.hf_local import local_snapshot

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


def tokenize(text: str, tokenizer: str, train_chars: int | None = None, bpe=None
             ) -> tuple[torch.Tensor, int]:
    """(token ids, vocabulary size): bytes; ``bpe:N``, a byte-level BPE of N tokens
    learned from the first ``train_chars`` characters (the training text: the test
    text never shapes the vocabulary), or the one given as ``bpe``; or the Hugging Face
    tokenizer ``tokenizer`` found on this machine (kdrun/store/hf_local.py)."""
    if tokenizer == "bytes":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), BYTE_VOCAB
    if tokenizer.startswith("bpe:"):
        bpe = bpe or learned_bpe(text[:train_chars], int(tokenizer[4:]))
        return torch.tensor(bpe.encode(text).ids, dtype=torch.long), bpe.get_vocab_size()
    tok = local_tokenizer(tokenizer)
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long), len(tok)


def local_tokenizer(name: str):
    """The Hugging Face tokenizer ``name`` (``dataset.tokenizer``) found on this machine."""
    from transformers import AutoTokenizer

    folder = local_snapshot(name, "dataset.tokenizer")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def learned_bpe(text: str, size: int):
    """A byte-level BPE tokenizer (the ``tokenizers`` library, as GPT-2's: every byte a
    token to start, so any text encodes, and each token decodes to exact bytes) whose
    merges are learned from ``text`` up to ``size`` tokens; the same text gives the same
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


def byte_of_char() -> dict[str, int]:
    """The byte each character of a byte-level BPE's tokens stands for: GPT-2's table,
    printable bytes as themselves and the others moved to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, moved = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + moved)] = b
            moved += 1
    return chars


class ByteView:
    """The teacher's view of a student's windows when the student reads a learned BPE and
    the teacher reads bytes (``dataset.teacher_tokenizer=bytes``): each window's text as
    bytes, right-padded to ``positions``, and for each student position the teacher
    position that predicts the same next text, the byte before the next student token's
    first byte (every BPE token starts on a byte boundary: the two align on the text)."""

    def __init__(self, token_bytes: list[bytes], positions: int):
        self.token_bytes, self.positions = token_bytes, positions

    @classmethod
    def of(cls, bpe) -> ByteView:
        """The view of a byte-level BPE's tokens, its window length still to be set."""
        table = byte_of_char()
        return cls([bytes(table[c] for c in bpe.id_to_token(i))
                    for i in range(bpe.get_vocab_size())], 0)

    def span(self, row: list[int]) -> int:
        """The bytes of a window of token ids."""
        return sum(len(self.token_bytes[t]) for t in row)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the windows as bytes (rows, positions), the aligned positions (rows, tokens))."""
        texts = torch.zeros(len(x), self.positions, dtype=torch.long)
        aligned = torch.zeros(x.shape, dtype=torch.long)
        for i, row in enumerate(x.tolist()):
            pieces = [self.token_bytes[t] for t in row]
            text = b"".join(pieces)
            texts[i, :len(text)] = torch.tensor(list(text))
            ends = torch.tensor([len(p) for p in pieces]).cumsum(0)
            aligned[i] = ends - 1  # the last byte of token j predicts token j + 1's first
        return texts.to(x.device), aligned.to(x.device)


def check_tokenizer(value) -> str | None:
    """``dataset.tokenizer``: bytes, bpe:N (257 to 65536 tokens), or a Hugging Face name or
    folder."""
    if not isinstance(value, str) or not value:
        return "must be bytes, bpe:N, or a Hugging Face tokenizer's name or folder"
    if value.startswith("bpe:"):
        size = value[4:]
        if not size.isdigit() or not 257 <= int(size) <= 65536:
            return ("bpe:N learns a byte-level BPE of N tokens from the training text: N "
                    "from 257 (the 256 bytes and one merge) to 65536")
    return None


@DATASETS.register("text_lm", rules={
    "seq_len": number(2, integer=True), "sentences": number(10, integer=True),
    "test_fraction": FRACTION, "seed": SEED, "tokenizer": check_tokenizer,
    "teacher_tokenizer": lambda v: None if v in (None, "bytes") else (
        "must be null (the data's tokenizer) or bytes (with tokenizer=bpe:N)")})
def text_lm(files: str | None = None, seq_len: int = 64, sentences: int = 6000,
            test_fraction: float = 0.1, seed: int = 0, tokenizer: str = "bytes",
            text_column: str = "text", hf_dataset: str | None = None,
            hf_split: str = "train", teacher_tokenizer: str | None = None) -> RawData:
    """Next-token prediction on ``files`` (text files, or a table's ``text_column``, its
    rows joined by newlines), on a Hugging Face dataset's ``text_column`` alike, or on
    generated text (``sentences`` of GRAMMAR), tokenized by ``tokenizer``, judged by
    perplexity."""
    table = read_rows(files, hf_dataset, hf_split, {"text_column": text_column})
    if table is not None:
        text = "\n".join(table[text_column].astype(str))
    elif files is not None:
        text = read_text(files)
    else:
        text = grammar_text(sentences, seed)
    if not text.strip():
        raise DataError(f"dataset.{'hf_dataset' if hf_dataset else 'files'}="
                        f"{hf_dataset or files}: the text is empty")
    bpe = learned_bpe(text[:int(len(text) * (1 - test_fraction))], int(tokenizer[4:])) \
        if tokenizer.startswith("bpe:") else None  # learned once, for the teacher's view too
    tokens, vocab = tokenize(text, tokenizer, bpe=bpe)
    cut = int(len(tokens) * (1 - test_fraction))
    x_train, y_train = windows(tokens[:cut], seq_len)
    x_test, y_test = windows(tokens[cut:], seq_len)
    raw = RawData(x_train, y_train, x_test, y_test, vocab, metric=PERPLEXITY)
    if teacher_tokenizer is not None and teacher_tokenizer != tokenizer:
        raw.teacher, raw.teacher_view = teacher_text(text, bpe, tokens[:cut], x_train, x_test)
    return raw


def teacher_text(text: str, bpe, student_train: torch.Tensor, *student_windows):
    """The teacher's own data (the same text as bytes, in windows as long as the longest
    student window's bytes, so that it can read any of them whole; its training text ends
    where the students' does) and its view of the student's windows (tokenized by
    ``bpe``)."""
    view = ByteView.of(bpe)
    view.positions = max(view.span(row) for x in student_windows for row in x.tolist())
    tokens = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = view.span(student_train.tolist())  # the bytes of the students' training text
    x_train, y_train = windows(tokens[:cut], view.positions)
    x_test, y_test = windows(tokens[cut:], view.positions)
    return RawData(x_train, y_train, x_test, y_test, BYTE_VOCAB, metric=PERPLEXITY), view


# ------------------------------------------------------------ text classification

PAD, CLS = BYTE_VOCAB, BYTE_VOCAB + 1  # byte-level ids past the bytes: padding, the class token
CLS_VOCAB = BYTE_VOCAB + 2
SUBJECT_GROUPS = {"cat": 0, "dog": 0, "bird": 0, "child": 1, "teacher": 1, "student": 1,
                  "garden": 2, "window": 2}  # what a sentence is about: animal, person, thing


def grammar_sentences(sentences: int, seed: int) -> tuple[list[str], list[int]]:
    """``sentences`` sentences of GRAMMAR, each labelled by its subject's group (the noun of
    its first noun phrase: 0 animal, 1 person, 2 thing)."""
    text = grammar_text(sentences, seed)
    out = [s.strip() + "." for s in text.split(".") if s.strip()]
    labels = [next(SUBJECT_GROUPS[w] for w in s.split() if w.strip(".") in SUBJECT_GROUPS)
              for s in out]
    return out, labels


TABLES = (".csv", ".jsonl", ".json", ".parquet")  # files read as tables of columns


def read_table(files: str, columns: dict[str, str]):
    """A CSV, JSON-lines or Parquet file (by its extension) with the ``columns`` named
    (config key -> column name), as a pandas DataFrame; one line for what is wrong."""
    import pandas as pd

    path = Path(files).expanduser()
    if not path.is_file():
        raise DataError(f"dataset.files={files}: no such file; give a .csv, .jsonl or "
                        ".parquet file, or null for generated text")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            table = pd.read_json(path, lines=True)
        else:
            table = pd.read_csv(path)
    except ImportError as e:  # Parquet needs pyarrow (or fastparquet)
        raise DataError(f"dataset.files={files}: reading Parquet needs pyarrow: pip install "
                        f"pyarrow ({e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"dataset.files={files}: not a readable {path.suffix} file ({e})") \
            from None
    check_columns(columns, list(map(str, table.columns)), path.name)
    return table


def check_columns(columns: dict[str, str], found: list[str], source: str) -> None:
    """Each column named (config key -> column name) is one of ``found``, else one line."""
    for key, column in columns.items():
        if column not in found:
            raise DataError(f"dataset.{key}={column}: no such column in {source}; its "
                            f"columns: {', '.join(found)}")


def read_rows(files: str | None, hf_dataset: str | None, hf_split: str, columns: dict):
    """The table a text data set reads: a Hugging Face dataset, or a table file (by its
    extension); None for plain text files or generated text."""
    if hf_dataset is not None and files is not None:
        raise DataError(f"dataset.hf_dataset={hf_dataset} and dataset.files={files}: give "
                        "one of them")
    if hf_dataset is not None:
        return read_hf_dataset(hf_dataset, hf_split, columns)
    if files is not None and Path(files).suffix in TABLES:
        return read_table(files, columns)
    return None


def read_hf_dataset(name: str, split: str, columns: dict[str, str]):
    """A split of a Hugging Face ``datasets`` dataset with the ``columns`` named, as a
    pandas DataFrame: a folder ``save_to_disk`` wrote, a folder of data files, or a
    dataset name in the library's local cache. Offline: never downloaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("dataset.hf_dataset: reading a Hugging Face dataset needs its "
                        "library: pip install 'kdrun[lm]'") from None
    path = Path(name).expanduser()
    saved = path.is_dir() and any((path / f).exists() for f in (
        "dataset_dict.json", "dataset_info.json", "state.json"))
    try:
        with hub_offline(datasets):
            found = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(name)
    except Exception as e:  # the library raises many kinds for "not here"
        raise DataError(f"dataset.hf_dataset={name}: not on this machine, neither a folder "
                        f"save_to_disk wrote or of data files, nor a dataset in the local "
                        f"Hugging Face cache (kdrun never downloads: load it once where there "
                        f"is a network, then dataset.save_to_disk(FOLDER)) ({type(e).__name__})"
                        ) from None
    if isinstance(found, datasets.DatasetDict):
        if split not in found:
            raise DataError(f"dataset.hf_split={split}: no such split in {name}; its splits: "
                            f"{', '.join(found)}")
        found = found[split]
    check_columns(columns, found.column_names, name)
    return found.to_pandas()


@contextmanager
def hub_offline(datasets):
    """The datasets library offline (its flags as HF_DATASETS_OFFLINE=1 would set them at
    import; an offline library fails at once where it would retry a network for half a
    minute), restored afterwards."""
    from huggingface_hub import constants

    flags = [(datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (constants, "HF_HUB_OFFLINE")]
    before = [getattr(owner, flag) for owner, flag in flags]
    for owner, flag in flags:
        setattr(owner, flag, True)
    try:
        yield
    finally:
        for (owner, flag), value in zip(flags, before):
            setattr(owner, flag, value)


def read_labelled(files: str | None, text_column: str, label_column: str,
                  hf_dataset: str | None = None, hf_split: str = "train"):
    """The text and label columns of a table file or a Hugging Face dataset."""
    table = read_rows(files, hf_dataset, hf_split,
                      {"text_column": text_column, "label_column": label_column})
    return table[text_column].astype(str).tolist(), table[label_column].tolist()


def encode_padded(texts: list[str], seq_len: int) -> torch.Tensor:
    """(texts, seq_len) byte ids: the class token, then the text's bytes, cut or padded."""
    rows = torch.full((len(texts), seq_len), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [CLS, *text.encode("utf-8")][:seq_len]
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows


@DATASETS.register("text_cls", rules={
    "seq_len": number(2, integer=True), "sentences": number(10, integer=True),
    "test_fraction": FRACTION, "seed": SEED})
def text_cls(files: str | None = None, text_column: str = "text", label_column: str = "label",
             seq_len: int = 64, sentences: int = 3000, test_fraction: float = 0.2,
             seed: int = 0, hf_dataset: str | None = None, hf_split: str = "train") -> RawData:
    """Sequence classification of ``files``' text column by its label column, or of
    generated sentences by their subject's group; byte-level ids with a class token in
    front (vocabulary CLS_VOCAB), judged by accuracy."""
    if files is None and hf_dataset is None:
        texts, labels = grammar_sentences(sentences, seed)
    else:
        texts, labels = read_labelled(files, text_column, label_column, hf_dataset, hf_split)
    if not texts:
        raise DataError(f"dataset.{'hf_dataset' if hf_dataset else 'files'}="
                        f"{hf_dataset or files}: no rows")
    classes = sorted(set(labels), key=str)
    y = torch.tensor([classes.index(label) for label in labels])
    return carve_test(encode_padded(texts, seq_len), y, test_fraction, seed, len(classes))
