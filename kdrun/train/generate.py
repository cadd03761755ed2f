"""Text a language model writes: a prompt continued one sampled token at a time (the
teacher's transfer set for sequence-level KD, the student's own text for on-policy KD)."""

from __future__ import annotations

import torch
from torch import nn

from kdrun.models import eval_mode


@torch.no_grad()
def continue_text(model: nn.Module, prompts: torch.Tensor, positions: int, temperature: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``prompts`` (rows, prompt length) of token ids continued by ``model`` to
    ``positions`` tokens, each next token drawn from its softmax at ``temperature`` by
    ``generator`` on the CPU (the same draws on any device). The model's whole context
    is run again for each token: no cache of keys and values, enough for short windows."""
    tokens = prompts
    with eval_mode(model):
        while tokens.shape[1] < positions:
            logits = model(tokens)[:, -1].float().cpu()
            probs = torch.softmax(logits / temperature, -1)
            step = torch.multinomial(probs, 1, generator=generator).to(tokens.device)
            tokens = torch.cat([tokens, step], 1)
    return tokens
