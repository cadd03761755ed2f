"""Distillation losses: one DistillationLoss subclass per method (losses/base.py says
what every loss is and can do), each registered by name in LOSSES where it is defined.

Where each lives: kd.py (KD, CE), response.py (logit-based: mse_logits, dkd, dist),
standardized.py (kd_ls), feature.py (fitnet, at, hidden_cosine), relation.py (rkd, sp, pkt),
contrastive.py (crd), review.py (reviewkd), divergence.py (reverse_kl, jsd, skew_kl,
tv: token-level divergences for language models); mutual.py holds DML, the loss of
scheme=dml (not a loss option: the scheme builds it). To add a method: write its
class in a module of this folder (every module here is imported, so its classes
register) with ``@LOSSES.register("name")``, and add ``configs/loss/<name>.yaml``. A
class in your own package needs no edit here: name it by import path in your YAML.
"""

from kdrun.losses.base import LOSSES, Averaging, DistillationLoss, kd_loss, soft_kl
from kdrun.losses.feature import AT, FitNet
from kdrun.losses.kd import CE, KD, soft_target_entropy
from kdrun.losses.mutual import DML
from kdrun.losses.relation import PKT, RKD, SP
from kdrun.losses.response import DIST, DKD, MSELogits
from kdrun.packages import import_every_module

__all__ = ["LOSSES", "Averaging", "DistillationLoss", "build_loss", "loss_class", "kd_loss",
           "soft_kl", "soft_target_entropy", "AT", "CE", "DIST", "DML", "DKD", "KD", "PKT",
           "RKD", "SP", "FitNet", "MSELogits"]


import_every_module(__name__, __path__)  # every module here registers its losses


def loss_class(loss_cfg) -> type[DistillationLoss]:
    """The class ``loss_cfg.name`` names: a registered name or an import path."""
    return LOSSES.get(loss_cfg["name"], "loss.name")


def build_loss(loss_cfg) -> DistillationLoss:
    """Build the loss ``loss_cfg.name`` with the rest of ``loss_cfg`` as arguments."""
    params = {k: v for k, v in dict(loss_cfg).items() if k != "name"}
    return loss_class(loss_cfg)(**params)
