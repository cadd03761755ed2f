"""Model builders, each registered by name in MODELS where it is defined
(``@MODELS.register("name")``), and what every run does with a model
(kdrun/models/base.py: build, describe, its identity in a stage key, eval mode).
Where each lives: ``base.py`` (mlp, cnn, dsconv, the dml cohort), ``linear.py``
(logistic regression), ``cifar/`` (the CIFAR-100 KD benchmark's zoo: resnets, wide
resnets, vgg, mobile nets), ``hubs/`` (any model of timm or torchvision, weights files
and pretrained weights). To add a
family: one module in this folder or a sub-folder (every module is imported with the
package) and ``configs/teacher|student/<name>.yaml``."""

from kdrun.models.base import (
    MODELS,
    NOT_BUILDER_KEYS,
    Cohort,
    build_model,
    builder_hook,
    count_params,
    describe,
    eval_mode,
    example_inputs,
    forward_mflop,
    he_init,
    image_builder,
    input_spec,
    meta_architecture,
    meta_model,
    model_identity,
    need_images,
)
from kdrun.packages import import_every_module

__all__ = ["MODELS", "NOT_BUILDER_KEYS", "Cohort", "build_model", "builder_hook",
           "count_params", "describe", "eval_mode", "example_inputs", "forward_mflop", "he_init",
           "image_builder", "input_spec", "meta_architecture", "meta_model", "model_identity",
           "need_images"]

import_every_module(__name__, __path__)
