"""``arch: hf_lm``: a causal language model of Hugging Face transformers, built from its
config (GPT-2 or Llama style: layers, width, heads) and randomly initialised, so that it
needs no weights and no network; or, with ``name``, a pretrained one loaded from a local
folder or the Hugging Face cache (never downloaded: kdrun/store/hf_local.py), whose
weights' hash the stage key holds. Its tokenizer must be the data's (kdrun/data/text.py:
``tokenizer``; compared id by id in kdrun/models/hubs/vocabulary.py), its output rows at
least the tokenizer's tokens (rows beyond them are padding, dropped from every logit), its
context at least the data's windows. transformers is an optional
extra: ``pip install 'kdrun[lm]'``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.checks import number, one_of
from kdrun.errors import DataError, UserError
from kdrun.models.base import DROPOUT, MODELS
from kdrun.models.hubs.vocabulary import check_rows
from kdrun.store.hf_local import local_snapshot, weights_sha256

RULES = {"family": one_of("gpt2", "llama"), "layers": number(1, integer=True),
         "width": number(1, integer=True), "heads": number(1, integer=True),
         "dropout": DROPOUT,
         "name": lambda v: None if v is None or (isinstance(v, str) and v) else
         "must be a Hugging Face model name or a local folder, or null (built from config)"}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise UserError("arch=hf_lm needs transformers: pip install 'kdrun[lm]'") from e
    return transformers


class CausalLM(nn.Module):
    """A transformers causal LM as kdrun calls a model: token ids (batch, positions) in,
    next-token logits (batch, positions, vocabulary) out, where the vocabulary is the
    tokenizer's real size: output rows beyond it (a padded embedding table) are dropped."""

    outputs_per_token = True  # kdrun/train/tokens.py reads them as rows

    def __init__(self, lm: nn.Module, vocab: int, positions: int):
        super().__init__()
        self.lm, self.vocab, self.positions = lm, vocab, positions

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=tokens, use_cache=False).logits
        return logits if logits.shape[-1] == self.vocab else logits[..., : self.vocab]

    def example_inputs(self, batch: int, device=None) -> torch.Tensor:
        return fixed_token_ids(batch, self.positions, self.vocab, device)


def fixed_token_ids(batch: int, positions: int, vocab: int, device=None) -> torch.Tensor:
    """Token ids to time, trace or probe a model with (not floats: an embedding's input);
    fixed ones, so that a probe draws nothing from the global generator."""
    return (torch.arange(batch * positions, device=device) % vocab).view(batch, positions)


def check_heads(arch: str, width: int, heads: int) -> None:
    if width % heads:
        raise UserError(f"{arch}: width {width} must be a multiple of heads {heads}")


def hf_config(family: str, vocab: int, positions: int, layers: int, width: int, heads: int,
              dropout: float):
    t = _transformers()
    check_heads("hf_lm", width, heads)
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
          heads: int = 4, dropout: float = 0.0, name: str | None = None):
    """A randomly initialised ``family`` causal LM of ``layers`` x ``width``, or the
    pretrained model ``name`` (its own architecture: the other keys are unused)."""
    if len(input_shape) != 1:
        raise DataError(f"hf_lm reads token sequences; this data set has inputs of shape "
                        f"{tuple(input_shape)}: use dataset=text_lm")
    if name is not None:
        return pretrained(name, num_classes, input_shape[0])
    config, model_class = hf_config(family, num_classes, input_shape[0], layers, width, heads,
                                    dropout)
    return CausalLM(model_class(config), num_classes, input_shape[0])


def pretrained(name: str, vocab: int, positions: int) -> CausalLM:
    """``name``'s weights from this machine, whose logits are cut to the data's vocabulary
    of ``vocab`` tokens (its output rows beyond them are padding; fewer rows are refused:
    the run's check says so first, kdrun/models/hubs/vocabulary.py)."""
    folder = local_snapshot(name, "name")
    model = _transformers().AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    check_rows(model.config.vocab_size, vocab, f"hf_lm name={name}")
    return CausalLM(model, vocab, positions)


def meta_build(model_cfg, input_shape, num_classes: int) -> CausalLM | None:
    """A pretrained model's architecture, from its config file alone, on the current
    (meta) device: no weights read; None for a config-built model."""
    if model_cfg.get("name") is None:
        return None
    t = _transformers()
    config = t.AutoConfig.from_pretrained(local_snapshot(str(model_cfg.name), "name"),
                                          local_files_only=True)
    return CausalLM(t.AutoModelForCausalLM.from_config(config), num_classes, input_shape[0])


def check(model_cfg, prefix: str) -> None:
    """A pretrained name must be on this machine: one line before anything trains."""
    if model_cfg.get("name") is not None:
        local_snapshot(str(model_cfg.name), f"{prefix}.name")


def identity(model_cfg) -> dict:
    """The transformers version (its model code defines the computation) and, for a
    pretrained model, the hash of its weights."""
    found = {"transformers": _transformers().__version__}
    if model_cfg.get("name") is not None:
        found["weights_sha256"] = weights_sha256(local_snapshot(str(model_cfg.name), "name"))
    return found


def describe(model_cfg) -> str:
    if model_cfg.get("name") is not None:
        return str(model_cfg.name)
    return (f"{model_cfg.get('family', 'gpt2')} {model_cfg.get('layers', 2)}x"
            f"{model_cfg.get('width', 64)}")


hf_lm.check, hf_lm.identity, hf_lm.describe = check, identity, describe
hf_lm.meta_build = meta_build
hf_lm.loads_weights = lambda model_cfg: model_cfg.get("name") is not None
hf_lm.reads_tokens = True  # token ids in (kdrun/run/data_checks.py: check_token_models)
