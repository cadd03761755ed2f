"""One vocabulary for teacher, student and data, as pretrained language models ship it.

A model's output layer often has more rows than its tokenizer has tokens: embedding
tables are padded to a multiple of 64 or 128 for speed, by different amounts within one
family (Qwen2.5-7B 152,064 rows and Qwen2.5-0.5B 151,936 over one 151,665-token
tokenizer). The vocabulary is the tokenizer's real size (``len(tokenizer)``, added and
special tokens included); rows beyond it are padding, never a token of the data, and
``hf_lm`` drops them from every logit it returns (kdrun/models/hubs/hf_lm.py), so that
no loss, metric or cached target sees them. Zero-padding the smaller model's logits
instead, as one popular script does, would give padding ids real probability.

Token-level losses compare distributions id by id, so the tokenizers must agree id by
id: each pretrained model's own tokenizer (where its folder has one) is compared with the
data's, token string by token string, before anything trains.
"""

from __future__ import annotations

from pathlib import Path

from kdrun.errors import DataError
from kdrun.store.hf_local import local_snapshot

# A folder holds a tokenizer when it has one of these (what save_pretrained writes for a
# fast tokenizer, a GPT-2 / BPE one, or a SentencePiece one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def token_strings(folder: Path) -> list[str]:
    """Every token of the tokenizer in ``folder`` as a string, by id (its real size:
    added and special tokens included; an id with no token is '')."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [token or "" for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


def first_difference(ours: list[str], theirs: list[str]) -> int | None:
    """The first id whose token differs (one list shorter: the first id it lacks), or
    None when both are the same tokens."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def shown(tokens: list[str], i: int) -> str:
    return repr(tokens[i]) if i < len(tokens) else f"no token (it has {len(tokens)})"


def output_rows(folder: Path) -> int:
    """The number of output rows of the pretrained model in ``folder`` (its config's
    vocab_size), read without loading its weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size)


def check_rows(rows: int, vocab: int, what: str) -> None:
    """A model needs an output row per token of the data's tokenizer (more are padding)."""
    if rows < vocab:
        raise DataError(f"{what}: its output has {rows} rows, fewer than the {vocab} tokens "
                        "of the data's tokenizer; tokenize with the model's own tokenizer "
                        "(dataset.tokenizer=<its folder>)")


def check_pretrained_vocabulary(name: str, key: str, data_tokenizer: str, vocab: int) -> str:
    """Check the pretrained model ``name`` (config key ``key``) against the data's
    tokenizer (``dataset.tokenizer``; ``vocab`` tokens): at least one output row per
    token, and its own tokenizer, if its folder has one, the data's id by id. Returns
    what it found, for the run's vocabulary line; a DataError (one line) otherwise."""
    folder = local_snapshot(name, key)
    rows = output_rows(folder)
    check_rows(rows, vocab, f"{key}={name}")
    padding = f"{rows} output rows, {rows - vocab} of them padding" if rows > vocab \
        else f"{rows} output rows"
    if not has_tokenizer(folder):
        return f"{key}={name}: {padding}; no tokenizer in its folder, taken to be the data's"
    if data_tokenizer == "bytes" or data_tokenizer.startswith("bpe:"):
        raise DataError(f"{key}={name} has its own tokenizer, and the data is tokenized as "
                        f"{data_tokenizer}: set dataset.tokenizer={name}")
    data_tokens = token_strings(local_snapshot(data_tokenizer, "dataset.tokenizer"))
    own = token_strings(folder)
    differ = first_difference(data_tokens, own)
    if differ is not None:
        raise DataError(f"{key}={name}: its tokenizer differs from the data's "
                        f"(dataset.tokenizer={data_tokenizer}) at id {differ}: "
                        f"{shown(data_tokens, differ)} in the data's, {shown(own, differ)} "
                        "in the model's; token-level losses compare one vocabulary id by id: "
                        "give every model and the data one tokenizer")
    return f"{key}={name}: {padding}; its tokenizer equals the data's, id by id"
