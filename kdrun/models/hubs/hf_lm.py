"""``arch: hf_lm``: a causal language model of Hugging Face transformers, built from its
config (GPT-2 or Llama style: layers, width, heads) and randomly initialised, so that it
needs no weights and no network. Its vocabulary and context length come from the data
(kdrun/data/text.py). transformers is an optional extra: ``pip install 'kdrun[lm]'``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.checks import number, one_of
from kdrun.errors import DataError, UserError
from kdrun.models.base import DROPOUT, MODELS

RULES = {"family": one_of("gpt2", "llama"), "layers": number(1, integer=True),
         "width": number(1, integer=True), "heads": number(1, integer=True),
         "dropout": DROPOUT}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise UserError("arch=hf_lm needs transformers: pip install 'kdrun[lm]'") from e
    return transformers


class CausalLM(nn.Module):
    """A transformers causal LM as kdrun calls a model: token ids (batch, positions) in,
    next-token logits (batch, positions, vocabulary) out."""

    outputs_per_token = True  # kdrun/train/tokens.py reads them as rows

    def __init__(self, lm: nn.Module, vocab: int, positions: int):
        super().__init__()
        self.lm, self.vocab, self.positions = lm, vocab, positions

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens, use_cache=False).logits

    def example_inputs(self, batch: int, device=None) -> torch.Tensor:
        """Token ids to time, trace or probe the model with (not floats: an embedding's
        input); fixed ones, so that a probe draws nothing from the global generator."""
        ids = torch.arange(batch * self.positions, device=device) % self.vocab
        return ids.view(batch, self.positions)


def hf_config(family: str, vocab: int, positions: int, layers: int, width: int, heads: int,
              dropout: float):
    t = _transformers()
    if width % heads:
        raise UserError(f"hf_lm: width {width} must be a multiple of heads {heads}")
    if family == "gpt2":
        return t.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width,
                            n_layer=layers, n_head=heads, resid_pdrop=dropout,
                            embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None,
                            eos_token_id=None), t.GPT2LMHeadModel
    return t.LlamaConfig(vocab_size=vocab, max_position_embeddings=positions,
                         hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, attention_dropout=dropout,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None), \
        t.LlamaForCausalLM


@MODELS.register("hf_lm", rules=RULES)
def hf_lm(input_shape, num_classes, family: str = "gpt2", layers: int = 2, width: int = 64,
          heads: int = 4, dropout: float = 0.0):
    """A randomly initialised ``family`` causal LM of ``layers`` x ``width``."""
    if len(input_shape) != 1:
        raise DataError(f"hf_lm reads token sequences; this data set has inputs of shape "
                        f"{tuple(input_shape)}: use dataset=text_lm")
    config, model_class = hf_config(family, num_classes, input_shape[0], layers, width, heads,
                                    dropout)
    return CausalLM(model_class(config), num_classes, input_shape[0])


def identity(model_cfg) -> dict:
    """The transformers version: its model code defines the computation."""
    return {"transformers": _transformers().__version__}


def describe(model_cfg) -> str:
    return (f"{model_cfg.get('family', 'gpt2')} {model_cfg.get('layers', 2)}x"
            f"{model_cfg.get('width', 64)}")


hf_lm.identity, hf_lm.describe = identity, describe
hf_lm.reads_tokens = True  # token ids in (kdrun/run/pipeline.py: check_token_models)
