"""Distillation losses: one small nn.Module per method, registered by name in LOSSES.

Every loss is called as ``loss(student_logits, teacher_logits, labels,
student_feature, teacher_feature)``. A loss whose ``needs_teacher`` is False
ignores the teacher; one with ``student_layer`` / ``teacher_layer`` reads those
layers' features (kdrun/features.py); one with ``prepare(student_shape,
teacher_shape)`` builds learned parts (e.g. a regressor) trained with the student.

Where each lives: kd.py (KD, CE), response.py (logit-based: mse_logits, dkd, dist),
feature.py (fitnet, at), relation.py (rkd, sp, pkt); mutual.py holds DML, the loss
of scheme=dml (not a loss option: the scheme builds it). To add a method: write its
class, add it to LOSSES, and add ``configs/loss/<name>.yaml``.
"""

from torch import nn

from kdrun.losses.feature import AT, FitNet
from kdrun.losses.kd import CE, KD, soft_kl, soft_target_entropy
from kdrun.losses.mutual import DML
from kdrun.losses.relation import PKT, RKD, SP
from kdrun.losses.response import DIST, DKD, MSELogits

LOSSES: dict[str, type[nn.Module]] = {
    "kd": KD, "ce": CE, "mse_logits": MSELogits, "dkd": DKD, "dist": DIST, "fitnet": FitNet,
    "at": AT, "rkd": RKD, "sp": SP, "pkt": PKT,
}

__all__ = ["LOSSES", "build_loss", "soft_kl", "soft_target_entropy", "AT", "CE", "DIST", "DML",
           "DKD", "KD", "PKT", "RKD", "SP", "FitNet", "MSELogits"]


def build_loss(loss_cfg) -> nn.Module:
    """Build the loss named ``loss_cfg.name`` with the rest of ``loss_cfg`` as arguments."""
    params = dict(loss_cfg)
    return LOSSES[params.pop("name")](**params)
