"""The config checks of the second phase: after the data is loaded, before anything
trains (the first, at composition: kdrun/run/validate.py). Each needs the data (its
shapes, its tokenizer, its transfer set) and says in one line what does not fit."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from kdrun.data import Data
from kdrun.errors import ConfigError
from kdrun.losses import build_loss, loss_class
from kdrun.models import build_model, builder_hook
from kdrun.models.hubs.vocabulary import check_pretrained_vocabulary
from kdrun.run import int8_students
from kdrun.run.schemes import SCHEMES, scheme_of
from kdrun.train.features import feature_shapes

log = logging.getLogger("kdrun")


def check(cfg: DictConfig, data: Data) -> torch.nn.Module | None:
    """Every check of this phase, in order; with int8 students, the student's int8 model
    they proved it converts to (timed after training)."""
    for each in (check_views, check_feature_layers, check_transfer_set, check_token_models,
                 check_vocabularies, scheme_of(cfg).check_data):
        each(cfg, data)
    return int8_students.check_converts(cfg, data)


def model_roles(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(config key, model config) of every model the run trains or reads."""
    scheme = scheme_of(cfg)
    roles = [("teacher", cfg.teacher)] if scheme.has_teacher else []
    return [*roles, ("student", cfg.student), *scheme.models(cfg)]


def check_views(cfg: DictConfig, data: Data) -> None:
    """Paired views (kdrun/data/views.py): the teacher's targets are computed once on its
    view of each example, by the offline scheme; a graph-reading model needs node ids."""
    views = f"{cfg.dataset.get('teacher_view')} for the teacher, " \
            f"{cfg.dataset.get('student_view')} for the student"
    if data.paired:
        if scheme_of(cfg).name != "offline":
            raise ConfigError("scheme", scheme_of(cfg).name, f"dataset={data.name} gives two "
                              f"views of each example ({views}): only scheme=offline distils "
                              f"across them")
        if cfg.dataset.get("augment") or not cfg.trainer.cache_teacher_logits:
            raise ConfigError("trainer.cache_teacher_logits", cfg.trainer.cache_teacher_logits,
                              f"dataset={data.name} gives two views of each example ({views}): "
                              "the teacher's targets are computed once on its view, so keep "
                              "it true and leave dataset.augment unset")
    for role, view_data in (("student", data), ("teacher", data.teacher_data or data)):
        node = cfg.get(role)
        if node is None or (role == "teacher" and not scheme_of(cfg).has_teacher):
            continue
        reads_graph = bool(builder_hook(node, "reads_graph"))
        if view_data.graph is not None and not reads_graph:
            raise ConfigError(f"{role}.arch", node.get("arch"), f"dataset.{role}_view=graph "
                              "gives node ids, which only a graph network reads (gcn, sage); "
                              f"for an mlp set dataset.{role}_view=features")
        if reads_graph and view_data.graph is None:
            raise ConfigError(f"{role}.arch", node.get("arch"), f"it reads a graph, and "
                              f"dataset={data.name} gives the {role} none: use dataset=csbm "
                              f"or dataset=planetoid with dataset.{role}_view=graph")


def check_token_models(cfg: DictConfig, data: Data) -> None:
    """Text (token ids) needs a language model for every role: one line, not a traceback
    from a linear layer given integers."""
    if (not getattr(data.train, "in_memory", False) or data.train.x.is_floating_point()
            or data.graph is not None):  # a graph's node ids are not tokens
        return
    for prefix, node in model_roles(cfg):
        if not builder_hook(node, "reads_tokens"):
            raise ConfigError(f"{prefix}.arch", node.get("arch"), f"dataset={data.name} gives "
                              "token ids, which only a language model reads: use hf_lm")


def check_vocabularies(cfg: DictConfig, data: Data) -> None:
    """Before anything trains: every pretrained language model has an output row per token
    of the data's tokenizer and, where it ships its own tokenizer, the same tokens id by
    id (kdrun/models/hubs/vocabulary.py); one line says what was found, padding rows
    dropped included."""
    if not data.per_position:
        return
    tokenizer = str(cfg.dataset.get("tokenizer") or "bytes")
    found = [check_pretrained_vocabulary(str(node.name), f"{prefix}.name", tokenizer,
                                         data.num_classes)
             for prefix, node in model_roles(cfg)
             if node.get("arch") == "hf_lm" and node.get("name") is not None]
    if found:
        log.info("vocabulary: %d tokens (dataset.tokenizer=%s); padding rows beyond them are "
                 "dropped from every logit before any loss, metric or cached target; %s",
                 data.num_classes, tokenizer, "; ".join(found))


def check_transfer_set(cfg: DictConfig, data: Data) -> None:
    """Before anything trains: the "scratch, all labels" reference needs a scheme that
    offers it and the transfer set's true labels. (A scheme without a teacher, deep mutual
    learning, has none to label a transfer set: its students learn from the labelled
    examples only, as their rows' train_unlabeled says.)"""
    scheme = scheme_of(cfg)
    budget = cfg.split.get("labeled") is not None and data.transfer_labels is not None
    if data.transfer is not None and scheme.teacher_learns_every_label and budget:
        log.info("scheme=%s: the teacher learns from every label, the %d held back included "
                 "(the data owner's teacher); the scratch student from the %d labelled "
                 "examples", scheme.name, data.unlabeled_count, len(data.train))
    elif data.transfer is not None and not scheme.uses_transfer_set:
        log.warning("scheme=%s does not use the %d unlabelled examples: its scratch student "
                    "trains on the labelled ones only", scheme.name, data.unlabeled_count)
    if cfg.get("all_labels_reference") and not scheme.all_labels_reference:
        offering = [n for n in SCHEMES.names()
                    if SCHEMES.get(n, "scheme.name").all_labels_reference]
        raise ConfigError("all_labels_reference", True, f"a reference row of "
                          f"{' and '.join(f'scheme={n}' for n in offering)}, not of "
                          f"scheme={scheme.name}")
    if cfg.get("all_labels_reference") and data.transfer_labels is None:
        raise ConfigError("all_labels_reference", True, "needs a transfer set whose labels "
                          "exist (split.labeled, or dataset.unlabeled of generated data); "
                          "set it to false")


def check_feature_layers(cfg: DictConfig, data: Data) -> None:
    """Before anything trains: a feature loss can read its layers from these models
    (e.g. attention transfer needs feature maps on both sides)."""
    teacher_cfg = scheme_of(cfg).feature_teacher(cfg)
    if teacher_cfg is None or not loss_class(cfg.loss).reads_features:
        return
    teacher_data = data.teacher_data or data  # the teacher's view, where it reads another
    student = build_model(cfg.student, data.input_shape, data.num_classes, "student", data.graph)
    teacher = build_model(teacher_cfg, teacher_data.input_shape, data.num_classes, "teacher",
                          teacher_data.graph)
    loss = build_loss(cfg.loss)
    loss.prepare(*feature_shapes(loss, student, teacher, data.input_shape, data.per_position,
                                 teacher_data.input_shape))
