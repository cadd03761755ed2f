"""A sweep's jobs composed once per set of structural overrides, then given their plain
values as Hydra gives them: shared by the command's preflight and the batched launcher
(which installs ``compose_each_job_once`` on Hydra's config loader)."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict


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


def compose_each_job_once(config_loader) -> None:
    """Hydra's sweeper composes every job of a batch to validate it, then the launcher
    composes it again ("this repeats work the launcher will do", says Hydra), ~0.14 s a
    job here. Both run in this process: the launcher gets a copy of the first. And jobs
    that differ only in plain values (``loss.T=2``) are composed once per set of their
    other overrides, then given their values as Hydra gives them (``OmegaConf.update``
    in order, as kdrun's preflight does), their task overrides and their folder name.
    tests/test_batched.py compares the result with Hydra's own composition."""
    compose = config_loader.load_sweep_config
    if getattr(compose, "kdrun_once", False):
        return
    composed: dict = {}

    def once(master_config: DictConfig, sweep_overrides):
        key = (id(master_config), tuple(sweep_overrides))
        if key not in composed:
            try:
                job = reuse_composition(master_config, list(sweep_overrides), compose, composed)
            except Exception:  # let Hydra's own composition name the problem
                job = compose(master_config, list(sweep_overrides))
            composed[key] = (master_config, job)
        return copy.deepcopy(composed[key][1])

    once.kdrun_once = True
    config_loader.load_sweep_config = once


def reuse_composition(master_config: DictConfig, overrides: list[str], compose,
                      composed: dict) -> DictConfig:
    """``compose(master_config, overrides)``, from the composition of the job's overrides
    less its plain value overrides (``split_plain``) when one exists (else made and kept),
    given the job's values, task overrides and folder name as Hydra gives them."""
    from hydra._internal.config_loader_impl import get_overrides_dirname  # Hydra's own; if it

    # moves, the ImportError sends every job to a full composition
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    plain, rest = split_plain(parsed)
    if not plain:
        return compose(master_config, overrides)
    key = ("base", id(master_config), rest)
    if key not in composed:
        composed[key] = (master_config, compose(master_config, list(rest)))
    cfg = with_values(composed[key][1], plain)
    app = [o for o in parsed if not o.is_hydra_override()]
    dirname = cfg.hydra.job.config.override_dirname
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in app]
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
    return cfg
