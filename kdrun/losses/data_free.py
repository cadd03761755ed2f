"""The loss terms of data-free distillation (scheme=data_free, kdrun/train/data_free.py),
each a plain function of the teacher's and the student's outputs on generated inputs.

- the discrepancy the student minimises and an adversarial generator maximises: DFAD's
  mean absolute error between logits (Fang et al. 2019), or the KL divergence;
- DAFL's generator terms (Chen et al. 2019, ICCV): one-hot, activation, information entropy;
- DeepInversion's batch-norm statistics prior (Yin et al. 2020, CVPR), read by hooks on
  the teacher's batch-norm layers (BatchNormPrior).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def l1_discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DFAD's model discrepancy: the mean absolute difference of the logits, over rows and
    classes (``F.l1_loss``, as its code computes it)."""
    return F.l1_loss(student_logits, teacher_logits)


def kl_discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions, averaged over rows."""
    return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                    reduction="batchmean", log_target=True)


DISCREPANCIES = {"l1": l1_discrepancy, "kl": kl_discrepancy}


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's L_oh: the cross-entropy of the teacher's logits against its own top class,
    low when the teacher is sure of each generated input."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's L_a: minus the mean absolute activation of the teacher's features (the class
    head's input), low when the generated inputs excite the teacher's filters."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's L_ie: minus the entropy (base 10, as DAFL's code computes it) of the teacher's
    mean predicted distribution over the batch, low when the batch covers the classes
    evenly."""
    mean = F.softmax(teacher_logits, 1).mean(0)
    return (mean * torch.log(mean)).sum() / math.log(10)


def bn_statistics_loss(inputs: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's term for one batch-norm layer: the L2 distance between the batch's
    per-channel mean of the layer's input and the layer's running mean, plus that between
    the batch's (biased) variance and the running variance."""
    channels = inputs.shape[1]
    per_channel = inputs.transpose(0, 1).reshape(channels, -1)
    mean, var = per_channel.mean(1), per_channel.var(1, unbiased=False)
    return torch.linalg.vector_norm(running_var - var) + torch.linalg.vector_norm(
        running_mean - mean)


class BatchNormPrior:
    """Hooks on each batch-norm layer of a model (in eval mode: its running statistics are
    the training data's); after a forward pass, ``loss()`` is DeepInversion's prior, the
    sum of ``bn_statistics_loss`` over the layers."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.track_running_stats]
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._keep) for layer in self.layers]

    def _keep(self, layer, inputs, output) -> None:
        self.terms.append(bn_statistics_loss(inputs[0], layer.running_mean, layer.running_var))

    def clear(self) -> None:
        """Forget the forward passes so far (call before the one to score)."""
        self.terms = []

    def loss(self) -> torch.Tensor:
        """The prior of the forward passes since ``clear``."""
        return sum(self.terms)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
