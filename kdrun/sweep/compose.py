"""A sweep's jobs composed once per set of structural overrides, then given their plain
values as Hydra gives them: shared by the command's preflight and the batched launcher."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def split_plain(parsed: list) -> tuple[list, tuple[str, ...]]:
    """A job's parsed overrides split into its plain ``a.b=value`` ones and the rest (as
    typed). Hydra composes the config groups and the other overrides, then applies each
    plain one in order with ``OmegaConf.update(cfg, key, value, merge=True)`` on the
    struct config: so a composition without them, copied and given them
    (``with_values``), is the job's. Shared by preflight and the batched launcher."""
    from hydra.core.override_parser.types import OverrideType

    plain = [o for o in parsed if o.type == OverrideType.CHANGE and o.package is None
             and "." in o.key_or_group and "/" not in o.key_or_group
             and not o.is_hydra_override() and not o.is_sweep_override()]
    return plain, tuple(o.input_line for o in parsed if o not in plain)


def with_values(cfg: DictConfig, plain: list) -> DictConfig:
    """A copy of ``cfg`` with the plain overrides applied, in order, as Hydra applies them."""
    import copy

    cfg = copy.deepcopy(cfg)
    for override in plain:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg
