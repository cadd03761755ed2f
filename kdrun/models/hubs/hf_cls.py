"""``arch: hf_cls``: a DistilBERT-style sequence classifier of Hugging Face transformers,
built from its config and randomly initialised (no weights, no network), for text whose
first token is a class token and whose padding is ``pad_id`` (kdrun/data/text.py:
``text_cls``). transformers is an optional extra: ``pip install 'kdrun[lm]'``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.checks import number
from kdrun.errors import DataError
from kdrun.models.base import DROPOUT, MODELS
from kdrun.models.hubs.hf_lm import _transformers, check_heads, fixed_token_ids, identity

RULES = {"layers": number(1, integer=True), "width": number(1, integer=True),
         "heads": number(1, integer=True), "dropout": DROPOUT,
         "vocab": number(2, integer=True), "pad_id": number(0, integer=True)}


class SequenceClassifier(nn.Module):
    """Token ids (batch, positions) in, class logits (batch, classes) out; padding
    masked out of attention."""

    def __init__(self, model: nn.Module, pad_id: int, vocab: int, positions: int):
        super().__init__()
        self.model, self.pad_id, self.vocab, self.positions = model, pad_id, vocab, positions

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=(tokens != self.pad_id).long()).logits

    def example_inputs(self, batch: int, device=None) -> torch.Tensor:
        return fixed_token_ids(batch, self.positions, self.pad_id, device)  # no padding


@MODELS.register("hf_cls", rules=RULES)
def hf_cls(input_shape, num_classes, layers: int = 2, width: int = 64, heads: int = 4,
           dropout: float = 0.0, vocab: int = 258, pad_id: int = 256):
    """A randomly initialised DistilBERT of ``layers`` x ``width`` with a class head."""
    if len(input_shape) != 1:
        raise DataError(f"hf_cls reads token sequences; this data set has inputs of shape "
                        f"{tuple(input_shape)}: use dataset=text_cls")
    check_heads("hf_cls", width, heads)
    t = _transformers()
    config = t.DistilBertConfig(vocab_size=vocab, max_position_embeddings=input_shape[0],
                                dim=width, n_layers=layers, n_heads=heads, hidden_dim=4 * width,
                                dropout=dropout, attention_dropout=dropout,
                                seq_classif_dropout=dropout, num_labels=num_classes,
                                pad_token_id=pad_id)
    model = t.DistilBertForSequenceClassification(config)
    return SequenceClassifier(model, pad_id, vocab, input_shape[0])


def describe(model_cfg) -> str:
    return f"distilbert {model_cfg.get('layers', 2)}x{model_cfg.get('width', 64)}"


hf_cls.identity, hf_cls.describe = identity, describe  # identity: the transformers version
hf_cls.reads_tokens = True  # token ids in (kdrun/run/data_checks.py: check_token_models)
