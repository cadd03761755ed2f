"""A linear student: the lowest rung of capacity, for asking how much distillation buys
a model that cannot learn features of its own."""

from __future__ import annotations

import math

from torch import nn

from kdrun.models.base import MODELS


@MODELS.register("linear")
def linear(input_shape, num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the flattened input: one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
