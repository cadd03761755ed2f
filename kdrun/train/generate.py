"""Text a language model writes: a prompt continued one sampled token at a time (the
teacher's transfer set for sequence-level KD, the student's own text for on-policy KD)."""

from __future__ import annotations

import torch
from torch import nn

from kdrun.data.labels import NO_LOSS, UNLABELED
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


@torch.no_grad()
def respond(model: nn.Module, x: torch.Tensor, y: torch.Tensor, end_token: int,
            temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction windows (kdrun/data/instructions.py) with ``model``'s own responses:
    each window's prompt (its positions up to the first target that is not NO_LOSS) kept,
    the rest written one sampled token at a time. The targets: UNLABELED on the written
    response through its first ``end_token`` (the writer's tokens carry no label: the
    soft term alone), NO_LOSS on the prompt and after the end, so that neither reaches a
    loss."""
    starts = (y != NO_LOSS).float().argmax(1)  # the first response target: prompt length - 1
    tokens = torch.cat([x, x[:, -1:]], 1)  # seq_len + 1 slots: inputs and their targets
    column = torch.arange(tokens.shape[1], device=x.device)
    with eval_mode(model):
        for t in range(int(starts.min()) + 1, tokens.shape[1]):
            logits = model(tokens[:, :t])[:, -1].float().cpu()
            drawn = torch.multinomial(torch.softmax(logits / temperature, -1), 1,
                                      generator=generator).squeeze(1).to(x.device)
            tokens[:, t] = torch.where(t > starts, drawn, tokens[:, t])
    targets = tokens[:, 1:]
    written = column[:-1] >= starts[:, None]
    ended = (targets == end_token) & written
    after_end = (ended.cumsum(1) - ended.long()) > 0  # past the first end token
    labels = torch.where(written & ~after_end, UNLABELED, NO_LOSS)
    return tokens[:, :-1], labels
